"""Durable, self-verifying files: write + hash in one pass, fsync, and the manifest that commits.

A checkpoint directory is valid iff its ``MANIFEST.json`` parses and every file it lists exists
with the listed size and sha256 (written last, so a directory without it is an unfinished write).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "fr_train.checkpoint.manifest/1"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


class _HashingWriter:
    """File-like sink that hashes what passes through: torch.save streams its zip sequentially, so
    the digest costs no second read of a multi-GB file."""

    def __init__(self, f: Any) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> int:
        self.h.update(data)
        self.n += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _fsync_close(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def write_torch(path: Path, obj: Any) -> FileEntry:
    """``torch.save`` to ``path``, fsynced; returns its size and sha256 (of the bytes on disk)."""
    with path.open("wb") as f:
        w = _HashingWriter(f)
        torch.save(obj, w)
        _fsync_close(f)
    return FileEntry(w.n, w.h.hexdigest())


def write_bytes(path: Path, data: bytes) -> FileEntry:
    with path.open("wb") as f:
        f.write(data)
        _fsync_close(f)
    return FileEntry(len(data), hashlib.sha256(data).hexdigest())


def write_json(path: Path, obj: Any) -> FileEntry:
    return write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def fsync_dir(path: Path) -> None:
    """Make a rename/creation inside ``path`` durable (POSIX: the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, step: int, files: dict[str, FileEntry]) -> None:
    write_json(directory / MANIFEST, {"format": MANIFEST_FORMAT, "step": step,
                                      "files": {name: e.to_dict() for name, e in sorted(files.items())}})


class CorruptCheckpointError(ValueError):
    """A checkpoint directory fails verification; the message names the file and the problem."""


_RESUME_HELP = ("--resume (checkpoint.resume) takes a checkpoint directory STORAGE/RUN/checkpoints/step_N, auto (the "
                "newest valid checkpoint of the run of the same name) or never (start fresh)")
# What a checkpoint directory holds before its manifest is written (manager.py's commit protocol).
_PARTIAL_WRITE = ("rank_*.pt", "rank_*.done.json", "rank_*.failed.json", "*.partial", "backbone.pt", "meta.json")


def _looks_like_partial_write(directory: Path) -> bool:
    """A manifest-less directory named like a checkpoint, or holding what one holds before its
    manifest is written: an interrupted write, not a wrong path."""
    if directory.name.startswith(("step_", ".tmp-step_")):
        return True
    return any(next(directory.glob(pattern), None) is not None for pattern in _PARTIAL_WRITE)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        if not directory.exists():
            raise CorruptCheckpointError(f"{directory}: does not exist. {_RESUME_HELP}")
        if not directory.is_dir():
            raise CorruptCheckpointError(f"{directory}: is a file, not a checkpoint directory. {_RESUME_HELP}")
        if _looks_like_partial_write(directory):
            raise CorruptCheckpointError(f"{path}: missing (the write never finished: a checkpoint without a "
                                         "manifest does not exist)")
        hint = ""
        if (directory / "checkpoints").is_dir():
            hint = f" (it holds checkpoints/: pass one of {directory / 'checkpoints'}/step_*, or auto)"
        raise CorruptCheckpointError(f"{directory}: is not an fr_train checkpoint: it has no {MANIFEST} and none of "
                                     f"the files a checkpoint write leaves (rank_*.pt, backbone.pt, meta.json){hint}. "
                                     f"{_RESUME_HELP}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(
            manifest.get("files"), dict):
        raise CorruptCheckpointError(f"{path}: field 'format' is not {MANIFEST_FORMAT!r} or 'files' is missing")
    for name, entry in manifest["files"].items():
        _check_entry(path, name, entry)
    return manifest


def _check_entry(manifest_path: Path, name: str, entry: Any) -> None:
    """Every entry names a file directly inside the checkpoint directory. WHY: verification hashes
    and loading reads the listed files, and a manifest is data from disk (possibly copied from
    elsewhere): '../x' or '/x' would make a resume read, and vouch for, files outside the checkpoint."""
    if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise CorruptCheckpointError(f"{manifest_path}: entry {name!r} is not a file name inside "
                                     f"{manifest_path.parent} (absolute, or with '/', '\\' or '..'); the manifest is "
                                     "corrupt or was not written by fr_train: do not resume from this checkpoint")
    if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
        raise CorruptCheckpointError(f"{manifest_path}: entry {name!r} is {entry!r}, expected "
                                     "{'size': <bytes>, 'sha256': <hex digest>}")


def verify_directory(directory: Path, *, hash_files: bool = True) -> dict[str, Any]:
    """The manifest of ``directory`` after checking every listed file; raises CorruptCheckpointError
    naming the first bad file. ``hash_files=False`` checks presence and sizes only (cheap). Every
    entry is checked to name a file inside ``directory`` before any file is touched."""
    manifest = read_manifest(directory)
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CorruptCheckpointError(f"{path}: size {size} bytes, {MANIFEST} says {entry['size']} "
                                         "(truncated or overwritten)")
        if hash_files:
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise CorruptCheckpointError(f"{path}: sha256 {digest[:16]}… does not match {MANIFEST}'s "
                                             f"{entry['sha256'][:16]}… (corrupted on disk)")
    return manifest
