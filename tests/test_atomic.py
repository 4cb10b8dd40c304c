"""Atomic writes (data_pipeline/atomic.py): the old file or the whole new one, with the mode a plain
write would give."""

from __future__ import annotations

import os
import stat

import pytest

from data_pipeline.atomic import atomic_path, atomic_write_bytes


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_written_file_gets_the_mode_of_a_plain_write_not_mkstemps_private_one(tmp_path, umask) -> None:
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "atomic", b"x")
        (tmp_path / "plain").write_bytes(b"x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "atomic").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask


def test_an_error_mid_write_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "data"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["data"]
