"""Specification of the .bin verification-set reader/writer and its restricted unpickler."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.binset import decode_image, read_bin, write_bin
from data_pipeline.errors import DataFormatError


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, 7)).save(buf, format="JPEG")
    return buf.getvalue()


def _images(n_pairs: int) -> list[bytes]:
    return [_jpeg(10 * i) for i in range(2 * n_pairs)]


def test_write_then_read_round_trips_images_and_labels(tmp_path: Path) -> None:
    images, issame = _images(3), [True, False, True]
    write_bin(tmp_path / "set.bin", images, issame)
    got_images, got_issame = read_bin(tmp_path / "set.bin")
    assert got_images == images
    assert got_issame.dtype == np.bool_ and got_issame.tolist() == issame
    assert decode_image(got_images[1], source="set.bin", index=1).shape == (8, 8, 3)


def test_written_file_is_the_plain_insightface_pickle(tmp_path: Path) -> None:
    """insightface reads sets with plain pickle.load; what we write must be exactly (list[bytes], list[bool])."""
    write_bin(tmp_path / "set.bin", _images(1), np.array([True]))
    with open(tmp_path / "set.bin", "rb") as f:
        images, issame = pickle.load(f)
    assert isinstance(images, list) and all(isinstance(b, bytes) for b in images)
    assert issame == [True] and type(issame[0]) is bool


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("form", ["array", "scalars"])
def test_numpy_bool_labels_are_accepted(tmp_path: Path, protocol: int, form: str) -> None:
    """Real sets often store issame as a numpy bool array (or a list of numpy.bool_)."""
    flags = np.array([True, False, False])
    issame = flags if form == "array" else list(flags)
    (tmp_path / "np.bin").write_bytes(pickle.dumps((_images(3), issame), protocol=protocol))
    _, got = read_bin(tmp_path / "np.bin")
    assert got.tolist() == [True, False, False]


def test_python2_style_pickle_with_byte_strings_is_read(tmp_path: Path) -> None:
    """Python-2 writers stored images as str (SHORT_BINSTRING); they must come back as bytes."""
    imgs = [b"\xff\xd8\xffa", b"\xff\xd8\xffb"]
    data = b"\x80\x02(](" + b"".join(b"U" + bytes([len(i)]) + i for i in imgs) + b"e](\x88et."
    (tmp_path / "py2.bin").write_bytes(data)
    got_images, got_issame = read_bin(tmp_path / "py2.bin")
    assert got_images == imgs and got_issame.tolist() == [True]


class _RunsCode:
    """An object whose unpickling would call ``func(*args)``."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "subprocess.call"])
def test_pickle_that_would_run_code_is_refused_and_not_executed(tmp_path: Path, attack: str) -> None:
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    payload = {
        "os.system": _RunsCode(os.system, cmd),
        "builtins.eval": _RunsCode(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _RunsCode(subprocess.call, ["touch", str(marker)]),
    }[attack]
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([payload, _jpeg(1)], [True]), protocol=4))
    with pytest.raises(DataFormatError) as err:
        read_bin(path)
    msg = str(err.value)
    assert str(path) in msg and "not a plain verification set" in msg
    refused = {"os.system": f"{os.system.__module__}.system", "builtins.eval": "builtins.eval", "subprocess.call": "subprocess.call"}[attack]
    assert f"'{refused}'" in msg  # names the refused module.name (os.system pickles as posix.system)
    assert not marker.exists()


def test_non_bool_numpy_labels_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "int.bin"
    path.write_bytes(pickle.dumps((_images(2), np.array([1, 0])), protocol=4))
    with pytest.raises(DataFormatError, match="only bool"):
        read_bin(path)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (([b"\xff\xd8\xff"] * 3, [True, False]), "3 images for 2 pairs"),
        (([b"\xff\xd8\xff", "text"], [True]), r"images\[1\]"),
        (([b"\xff\xd8\xff", b""], [True]), r"images\[1\]"),
        (([b"\xff\xd8\xff"] * 2, [1]), r"issame\[0\]"),
        ({"images": [], "issame": []}, "expected a pair"),
        (([b"\xff\xd8\xff"] * 2, [True], "extra"), "expected a pair"),
    ],
)
def test_bad_structure_is_a_clear_error_naming_file_and_place(tmp_path: Path, obj: object, message: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(DataFormatError, match=message) as err:
        read_bin(path)
    assert str(path) in str(err.value)


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.bin"
    write_bin(path, _images(2), [True, False])
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataFormatError, match="cannot be read as a verification set"):
        read_bin(path)


def test_write_refuses_mismatched_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        write_bin(tmp_path / "x.bin", [*_images(1), _jpeg(3)], [True])
    assert not (tmp_path / "x.bin").exists()


def test_undecodable_image_names_its_index() -> None:
    with pytest.raises(DataFormatError, match=r"set.bin: images\[4\]"):
        decode_image(b"not an image", source="set.bin", index=4)


def test_a_pickle_declaring_a_huge_frame_is_refused_not_a_memory_error(tmp_path: Path) -> None:
    """12 bytes that ask for a 2**62-byte frame (issue 26: MemoryError traceback)."""
    path = tmp_path / "frame.bin"
    path.write_bytes(b"\x80\x04\x95" + (2**62).to_bytes(8, "little") + b".")
    with pytest.raises(DataFormatError, match=r"frame\.bin: pickle: cannot be read as a verification set"):
        read_bin(path)
