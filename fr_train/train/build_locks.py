"""Clear the lock files that killed extension builds leave behind, so a restart never waits forever.

DeepSpeed JIT-compiles its ops (on CPU: the shared-memory communication op, built when
``deepspeed.initialize`` sets up ``deepspeed.comm``) with ``torch.utils.cpp_extension.load``. That
serialises builders with ``torch.utils.file_baton.FileBaton``: the builder creates
``<extensions root>/<op name>/lock`` with ``O_CREAT | O_EXCL``, keeps the descriptor open while it
compiles, then closes and deletes it; every other process polls until the file is gone, with no
timeout and no owner check. A builder killed mid-build (SIGKILL, OOM, a preempted node, a Ray
restart) never deletes it, and every later worker then hangs in ``FileBaton.wait`` with no message.

The file holds nothing (no pid), but its holder is known: the live builder has it open. So a lock
that no process has open is abandoned, with two caveats handled here:

* On a shared filesystem (NFS home directories are common on clusters) the builder may be a live
  process on another node, invisible in this node's ``/proc``. There a lock is only taken for
  abandoned once it is older than ``shared_grace_s`` (longer than any build); until then this
  function waits for it, so the total wait is bounded either way.
* ``FileBaton.release`` closes the descriptor a moment before deleting the file; a lock is removed
  only if it is still there, still unheld, a short ``confirm_s`` later.

Call :func:`clear_abandoned_build_locks` on every worker before ``deepspeed.initialize``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("fr_train.train.build_locks")

LOCK_NAME = "lock"  # torch.utils.cpp_extension._jit_compile: FileBaton(os.path.join(build_directory, 'lock'))
# Filesystem types whose files other hosts can hold open (fuse: sshfs, s3fs, gcsfuse, ...).
_SHARED_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
                        "9p", "afs", "ocfs2", "gfs2", "pvfs2", "orangefs", "wekafs", "virtiofs"})


def extensions_root() -> Path:
    """Where torch builds JIT extensions: ``TORCH_EXTENSIONS_DIR`` or torch's per-user default
    (which adds a ``py311_cpu``-style sub-folder; both depths are searched for locks)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def find_build_locks(root: Path) -> list[Path]:
    """``root/<op>/lock`` and ``root/<build folder>/<op>/lock``: every depth torch builds at."""
    if not root.is_dir():
        return []
    return sorted({*root.glob(f"*/{LOCK_NAME}"), *root.glob(f"*/*/{LOCK_NAME}")})


def local_holders(path: Path) -> list[int] | None:
    """Pids of the processes on this host that have ``path`` open, or None when that cannot be known
    (no ``/proc``). Matched by device and inode, so symlinked roots compare correctly. Processes
    of other users cannot be inspected; callers only trust an empty answer for their own files."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    try:
        target = path.stat()
    except FileNotFoundError:
        return []
    holders = []
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:  # exited meanwhile, or another user's process
            continue
        for fd in fds:
            try:
                st = fd.stat()  # follows the link to the open file
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                holders.append(int(fd_dir.parent.name))
                break
    return holders


def is_shared_filesystem(path: Path) -> bool:
    """Whether ``path`` lies on a network/cluster filesystem (or one this cannot identify): there
    another host's live builder would look like nobody."""
    import psutil

    real = os.path.realpath(path)
    best, fstype = "", ""
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint.rstrip("/") or "/"
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, fstype = mount, part.fstype
    if not best:
        return True
    return fstype in _SHARED_FS or fstype.startswith("fuse")


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _same_file(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove(lock: Path, why: str) -> bool:
    try:
        lock.unlink()
    except FileNotFoundError:  # its builder (or another worker running this) removed it first
        return False
    log.warning("removed the abandoned build lock %s (%s); the next load rebuilds the extension if needed "
                "(should that build fail, delete %s)", lock, why, lock.parent)
    return True


def clear_abandoned_build_locks(root: str | Path | None = None, *, shared_grace_s: float = 600.0,
                                confirm_s: float = 0.5, poll_s: float = 1.0,
                                shared: bool | None = None) -> list[Path]:
    """Remove the extension build locks under ``root`` (default: :func:`extensions_root`) whose
    builder is gone; return the removed paths. Never removes a lock a live local process holds.

    A lock nobody on this host holds is removed at once when this host can see every possible
    holder (``/proc`` readable, the lock is this user's, a local filesystem); otherwise (``shared``:
    True, or None and :func:`is_shared_filesystem` says so) once it is ``shared_grace_s`` old,
    waiting for that if needed, so this returns within about ``shared_grace_s``.
    """
    base = extensions_root() if root is None else Path(root)
    removed: list[Path] = []
    waiting: dict[Path, os.stat_result] = {}
    for lock in find_build_locks(base):
        first = _stat(lock)
        holders = local_holders(lock)
        if first is None:
            continue  # released meanwhile
        if holders:
            log.info("build lock %s is held by live pid(s) %s (an extension is being built); leaving it", lock,
                     holders)
            continue
        seen_all = holders is not None and first.st_uid == os.getuid()
        if seen_all and not (is_shared_filesystem(lock) if shared is None else shared):
            time.sleep(confirm_s)  # FileBaton.release closes the file a moment before it deletes it
            if _same_file(_stat(lock), first) and local_holders(lock) == [] and _remove(
                    lock, "no process holds it: its builder was killed mid-build"):
                removed.append(lock)
        else:
            waiting[lock] = first
    if waiting:
        log.warning("build lock(s) %s are held by no process on this host; on shared storage a build on another "
                    "node may hold them: waiting until they go or are %.0f s old", sorted(map(str, waiting)),
                    shared_grace_s)
    while waiting:
        for lock, first in list(waiting.items()):
            now = _stat(lock)
            if not _same_file(now, first) or local_holders(lock):
                del waiting[lock]  # released, or taken over by a live builder
                continue
            assert now is not None
            age = time.time() - now.st_mtime
            if age >= shared_grace_s:
                del waiting[lock]
                if _remove(lock, f"held by no process here and {age:.0f} s old, longer than any build "
                                 f"(shared_grace_s={shared_grace_s:g})"):
                    removed.append(lock)
        if waiting:
            time.sleep(poll_s)
    return removed
