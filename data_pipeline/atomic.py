"""Write a file so that a reader sees the old file or the whole new one, never a part.

The one implementation of the write-to-a-temporary-name-then-rename pattern (indexes, ``.bin`` sets,
saved models, run records): a crash or a full disk mid-write leaves the previous file intact and
no half-written file under the final name. The temporary file lives in the target's folder, so
the rename stays on one filesystem (atomic on POSIX).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    """The process's umask without changing it (Linux reports it in /proc; elsewhere the
    set-and-restore dance, which is racy only against another thread doing the same)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, the file written
    there is flushed to disk and renamed over ``path``; on an error it is removed. The file gets the
    mode a plain ``open(path, "w")`` would give (0666 less the umask), not mkstemp's private 0600:
    a dataset, a model or a features file is shared with the user's group as their umask says."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
