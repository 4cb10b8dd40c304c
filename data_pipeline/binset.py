"""Read and write insightface ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` is a pickle of ``(images, issame)``: ``images`` a list of encoded image bytes (JPEG/PNG)
and ``issame`` one bool per pair; images ``2i`` and ``2i+1`` form pair ``i``.

WHY a restricted unpickler: ``.bin`` files are downloaded from third parties, and a plain
``pickle.load`` runs whatever callable the file names (``os.system``, ``eval``, ...). We resolve
only the few globals a genuine verification set can contain: numpy bool arrays / bool scalars
(files written with ``np.array(issame)``, under any pickle protocol) and ``_codecs.encode`` restricted to latin-1 (which
Python 3 uses to pickle ``bytes`` under protocols 0-2). Anything else is refused before it is
called, with an error naming the file and the refused ``module.name``.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.atomic import atomic_path
from data_pipeline.errors import DataFormatError, data_error

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

PICKLE_PROTOCOL = 4  # what insightface's Python 3 tools write
_LATIN1 = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})


def _bool_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` as the unpickler may call it: only the bool dtype can be built."""
    dtype = np.dtype(*args)
    if dtype != np.bool_:
        raise pickle.UnpicklingError(f"numpy dtype {dtype!s} (only bool arrays may appear in a .bin)")
    return dtype


def _bool_scalar(dtype: np.dtype, *args: Any) -> Any:
    """``numpy...multiarray.scalar`` restricted to bool scalars (``np.bool_`` inside a list)."""
    if not isinstance(dtype, np.dtype) or dtype != np.bool_:
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype!s} (only bool scalars may appear in a .bin)")
    return _multiarray.scalar(dtype, *args)


def _bool_frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's protocol-5 array constructor, restricted to bool arrays."""
    if not isinstance(dtype, np.dtype) or dtype != np.bool_:
        raise pickle.UnpicklingError(f"numpy array of dtype {dtype!s} (only bool arrays may appear in a .bin)")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as used by protocol-2 pickles of ``bytes``: latin-1 text → bytes only."""
    if not isinstance(obj, str) or encoding.lower() not in _LATIN1:
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only latin-1 is used for bytes)")
    return obj.encode("latin-1", errors)


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _bool_scalar,
    ("numpy._core.multiarray", "scalar"): _bool_scalar,
    ("numpy.core.numeric", "_frombuffer"): _bool_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _bool_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _bool_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _VerificationSetUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``_ALLOWED``; everything else is an error, never a call."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        # encoding="bytes": Python-2-written sets pickle images as str; keep them as bytes.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise data_error(
                self._path,
                "pickle global",
                f"refused to load global '{module}.{name}': the file is not a plain verification set "
                "(only image bytes, lists and bools/numpy bool arrays are allowed) and loading it could "
                "execute code",
                "Do not use this file; re-create it with data_pipeline.binset.write_bin or get it from a trusted source",
            )
        return allowed


def _as_issame(raw: Any, path: Path) -> np.ndarray:
    """Validate the ``issame`` half: a list/tuple of bools or a 1-D numpy bool array."""
    if isinstance(raw, np.ndarray):
        if raw.dtype != np.bool_ or raw.ndim != 1:
            raise data_error(
                path, "issame", f"numpy array of dtype {raw.dtype} and shape {raw.shape}, expected a 1-D bool array",
                "Re-write the file with one bool per pair",
            )
        return raw.astype(bool, copy=True)
    if not isinstance(raw, (list, tuple)):
        raise data_error(path, "issame", f"is a {type(raw).__name__}, expected a list of bools",
                         "Re-write the file with one bool per pair")
    for i, value in enumerate(raw):
        if not isinstance(value, (bool, np.bool_)):
            raise data_error(path, f"issame[{i}]", f"is {type(value).__name__} {value!r}, expected a bool",
                             "Labels must be True (same identity) or False; re-write the file")
    return np.asarray(raw, dtype=bool).reshape(-1)


def read_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """Load a verification set: ``(encoded images, issame)``; pair i is images ``2i, 2i+1``.

    Raises :class:`~data_pipeline.errors.DataFormatError` for a refused pickle global or a
    structure that is not a verification set.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            obj = _VerificationSetUnpickler(f, path).load()
        except DataFormatError:
            raise  # a refused global, raised by find_class
        # MemoryError / OverflowError: a few bytes can declare a frame of 2**62 bytes
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError,
                OverflowError) as e:
            raise data_error(path, "pickle", f"cannot be read as a verification set ({type(e).__name__}: {e})",
                             "Check that the file is a complete insightface .bin with bool labels") from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise data_error(path, "top level", f"is a {type(obj).__name__}, expected a pair (images, issame)",
                         "Check that the file is an insightface .bin verification set")
    raw_images, raw_issame = obj
    issame = _as_issame(raw_issame, path)
    if not isinstance(raw_images, (list, tuple)):
        raise data_error(path, "images", f"is a {type(raw_images).__name__}, expected a list of encoded images",
                         "Check that the file is an insightface .bin verification set")
    images: list[bytes] = []
    for i, img in enumerate(raw_images):
        if not isinstance(img, (bytes, bytearray)) or len(img) == 0:
            raise data_error(path, f"images[{i}]", f"is {type(img).__name__} of length "
                             f"{len(img) if hasattr(img, '__len__') else '?'}, expected non-empty encoded image bytes",
                             "Re-write the file with JPEG/PNG bytes for every image")
        images.append(bytes(img))
    if len(images) != 2 * len(issame):
        raise data_error(path, "structure", f"{len(images)} images for {len(issame)} pairs; expected exactly "
                         f"{2 * len(issame)} (two consecutive images per pair)",
                         "The file is truncated or mislabelled; re-create it")
    return images, issame


def write_bin(path: str | Path, images: Sequence[bytes], issame: Sequence[bool] | np.ndarray) -> Path:
    """Write a verification set readable by insightface and :func:`read_bin` (atomically).

    ``issame`` is stored as a list of Python bools, the most portable form.
    """
    path = Path(path)
    flags = [bool(v) for v in np.asarray(issame, dtype=bool).reshape(-1)]
    imgs = [bytes(b) for b in images]
    if len(imgs) != 2 * len(flags):
        raise ValueError(f"write_bin({path}): {len(imgs)} images for {len(flags)} pairs; need exactly 2 per pair")
    if any(len(b) == 0 for b in imgs):
        raise ValueError(f"write_bin({path}): empty image bytes at index {next(i for i, b in enumerate(imgs) if not b)}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump((imgs, flags), f, protocol=PICKLE_PROTOCOL)
    return path


def decode_image(data: bytes, *, source: str | Path, index: int) -> np.ndarray:
    """Decode one encoded image of a set to ``HxWx3 uint8`` RGB, with an error naming where it is."""
    from PIL import Image  # local: reading/writing the pickle needs no imaging library

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises several types for corrupt data
        raise data_error(source, f"images[{index}]", f"cannot be decoded as an image ({e})",
                         "Re-create the set from valid JPEG/PNG files") from e
