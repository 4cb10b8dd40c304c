"""What a run's console may show besides fr_train's own lines (issue 25): the helper the console
tests share. A line is fr_train's when, after Ray's "(RayTrainWorker pid=N)" prefix and colour codes
are stripped, it starts with "[fr_train] " (or "fr_train: ", the CLI's one-line errors)."""

from __future__ import annotations

import re

_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\(\w+ pid=\d+(, ip=[^)]*)?\) ")


def foreign_lines(console: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """The console's non-empty lines that are not fr_train's and contain none of ``allowed``."""
    out = []
    for raw in console.splitlines():
        line = _RAY_PREFIX.sub("", _COLOUR.sub("", raw)).rstrip()
        if line and not line.startswith(("[fr_train] ", "fr_train: ")) and not any(a in line for a in allowed):
            out.append(line)
    return out
