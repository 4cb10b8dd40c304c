"""The synchronous part of an asynchronous save: a private host copy of the state to write.

Training may only stall for this copy (issue 5); everything after it (serialising, hashing,
fsync) runs in the background on the copy, so the caller can keep mutating its tensors. The copy
goes into fresh memory, or into the reusable host buffers of a ``HostStaging`` (staging.py: what
``CheckpointManager`` uses, issue 13). The walk also refuses, at save time and naming the key path,
anything ``torch.load(weights_only=True)`` could not read back, so a bad payload fails now rather
than at the resume that needs it.
"""

from __future__ import annotations

from typing import Any

import torch

from fr_train.checkpointing.staging import HostStaging

_SCALARS = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)


def snapshot(obj: Any, *, clone_cpu_tensors: bool = True, path: str = "payload",
             staging: HostStaging | None = None) -> Any:
    """Deep copy of ``obj`` with every tensor on the host, in fresh storage or, with ``staging``
    (inside its ``copying()`` block), in the staging buffer of the tensor's key path.

    Containers: dict (str/int keys), list, tuple. Leaves: tensors and plain scalars/bytes.
    ``clone_cpu_tensors=False`` skips the copy of tensors already on the CPU: only for payloads whose
    CPU tensors are private copies nobody mutates (e.g. ``PartialFC.state_dict()`` clones its rows).
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.is_sparse or t.layout != torch.strided:
            raise TypeError(f"{path}: {t.layout} tensors are not checkpointable here; store a dense tensor")
        if t.device.type == "cpu" and not clone_cpu_tensors:
            return t
        if staging is not None:
            return staging.copy(path, t)
        if t.device.type != "cpu":
            # A blocking copy: the background writer must never see a half-copied tensor.
            return t.to("cpu", copy=True)
        return t.clone()
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{path}: key {k!r} is a {type(k).__name__}; checkpoint keys must be str or int")
            out[k] = snapshot(v, clone_cpu_tensors=clone_cpu_tensors, path=f"{path}[{k!r}]", staging=staging)
        return out
    if isinstance(obj, list | tuple):
        items = [snapshot(v, clone_cpu_tensors=clone_cpu_tensors, path=f"{path}[{i}]", staging=staging)
                 for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(
        f"{path}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be loaded with "
        "torch.load(weights_only=True); store tensors, numbers, strings, bytes, dicts, lists or tuples "
        "(convert numpy arrays with torch.from_numpy, objects to their state_dict())"
    )
