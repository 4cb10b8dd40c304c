"""The one error type for data that cannot be used as it is on disk.

WHY a dedicated type: the trainer, the packer and the verifier must tell "your files are broken"
apart from programming errors, and every such message has to be actionable on its own: it names
the file, where in it (key, byte offset, line or field), what is wrong and what to do about it.
"""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A data file (RecordIO, index, property, .bin, image) is malformed or inconsistent.

    Build it with :func:`data_error` (or pass a complete message) so that the message always
    reads ``<file>: <where>: <problem>. <what to do>``.
    """


def data_error(path: str | Path, where: str, problem: str, fix: str) -> DataFormatError:
    """A :class:`DataFormatError` whose message names the file, the place, the problem and the fix.

    ``where`` is e.g. ``"key 17 (offset 4096)"``, ``"line 3"`` or ``"byte offset 120"``.
    """
    where_part = f"{where}: " if where else ""
    return DataFormatError(f"{path}: {where_part}{problem}. {fix}")
