"""Embed a `.bin` verification set with a backbone and score it (LFW protocol, TAR@FAR).

Images are decoded once into a uint8 tensor; each evaluation embeds the images and their
horizontal flips, sums and L2-normalises (insightface's test-time augmentation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.binset import decode_image, read_bin
from data_pipeline.errors import data_error
from fr_train.evaluation.embedders import Embedder, TorchEmbedder
from fr_train.evaluation.verification import check_pairs, combine_flip, evaluate_embeddings


@dataclass
class VerificationSet:
    name: str
    path: Path
    images: torch.Tensor  # [2N, 3, H, W] uint8, RGB
    issame: np.ndarray  # [N] bool


def find_eval_sets(data_dir: Path, names: list[str]) -> list[Path]:
    """Resolve `eval.sets`: paths as given, bare names as DATA/NAME.bin; empty: every DATA/*.bin."""
    if not names:
        return sorted(Path(data_dir).glob("*.bin"))
    out = []
    for name in names:
        p = Path(name).expanduser()
        if not p.suffix:
            p = Path(data_dir) / f"{name}.bin"
        if not p.is_file():
            raise FileNotFoundError(f"verification set {name!r} not found at {p} (eval.sets takes .bin paths or "
                                    f"names of .bin files in the dataset directory {data_dir})")
        out.append(p)
    return out


def load_verification_set(path: str | Path, image_size: tuple[int, int]) -> VerificationSet:
    """Decode a ``.bin`` at the model's ``image_size`` (H, W), refusing what cannot be scored
    faithfully (DataFormatError naming the file): too few pairs, pairs of one kind only, or images
    that are not square. A square image of another size is resized; a non-square one would be
    squashed, distorting every face in it, so the set is refused instead of scored wrong."""
    from PIL import Image

    path = Path(path)
    images, issame = read_bin(path)
    try:
        check_pairs(issame)
    except ValueError as e:
        raise data_error(path, "issame", str(e), "Use a complete verification set (e.g. LFW: 6000 pairs, half "
                         "genuine, half impostor)") from None
    arrays = []
    for i, data in enumerate(images):
        arr = decode_image(data, source=path, index=i)
        if arr.shape[0] != arr.shape[1]:
            raise data_error(path, f"images[{i}]", f"is {arr.shape[1]}x{arr.shape[0]} (WxH), not square; resizing it "
                             f"to the model's {image_size[1]}x{image_size[0]} would distort the face",
                             "Re-create the set from aligned square face crops (e.g. 112x112, as insightface's sets)")
        if arr.shape[:2] != tuple(image_size):
            arr = np.asarray(Image.fromarray(arr).resize((image_size[1], image_size[0]), Image.BILINEAR))
        arrays.append(arr)
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return VerificationSet(name=path.stem, path=path, images=tensor, issame=np.asarray(issame, dtype=bool))


def embed_images(embedder: Embedder, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """Flip-augmented, L2-normalised embeddings of uint8 NCHW images (insightface's protocol)."""
    outs, outs_flip = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].permute(0, 2, 3, 1).numpy()  # NHWC uint8, the embedders' input
        outs.append(embedder(x))
        outs_flip.append(embedder(x[:, :, ::-1]))
    return combine_flip(np.concatenate(outs), np.concatenate(outs_flip))


def far_name(far: float) -> str:
    """1e-3 → '1e-3' (stable metric/log key names)."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def evaluate_verification(model: torch.nn.Module | Embedder, vs: VerificationSet, batch_size: int,
                          device: torch.device) -> dict[str, Any]:
    """Score ``vs`` with a backbone (the trainer's, in its own dtype on ``device``) or any :class:`Embedder`."""
    if isinstance(model, torch.nn.Module):
        model = TorchEmbedder(model, device, image_size=int(vs.images.shape[-1]))
    emb = embed_images(model, vs.images, batch_size)
    r = evaluate_embeddings(emb, vs.issame)
    out: dict[str, Any] = {"accuracy": r.accuracy, "accuracy_std": r.accuracy_std, "threshold": r.threshold,
                           "val_at_far_1e-3": r.val_at_far_1e3}
    for far, tar in sorted(r.tar_at_far.items()):
        out[f"tar_at_far_{far_name(far)}"] = tar
    return out
