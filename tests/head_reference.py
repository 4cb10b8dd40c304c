"""Plain single-process float64 references for the sharded head (written for clarity, not speed).

Full softmax over all classes (or over an explicit set of columns), margin on the target logit
written straight from the formulas, autograd for every gradient. VPL: a memory bank updated by a
plain Python loop over the batch (so the last sample of a class wins by construction).
Also the shared inputs of the head tests: deterministic global batches every rank slices the same
way, and rank results passed as torch.save bytes (no tensors cross process queues).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fr_train.heads import CombinedMargin


@dataclass
class Margin:
    s: float
    m1: float
    m2: float
    m3: float
    linear: bool = False


def margin_target(cos: torch.Tensor, m: Margin) -> torch.Tensor:
    """s·(cos(m1θ+m2) − m3) with the ArcFace fallback (m1 = 1) or the SphereFace ψ (m1 > 1)."""
    theta = torch.acos(cos)
    if m.m1 == 1.0:
        arc = torch.cos(theta + m.m2)
        fallback = cos - m.m2 * math.sin(m.m2)
        g = torch.where(cos > math.cos(math.pi - m.m2), arc, fallback) if m.m2 > 0 else arc
    else:
        phi = m.m1 * theta + m.m2
        k = torch.floor(phi / math.pi).detach()
        g = (-1.0) ** k * torch.cos(phi) - 2.0 * k
    return m.s * (g - m.m3)


def reference_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    m: Margin,
    bias: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    prototypes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean softmax cross-entropy of the whole batch; ``columns``: sorted class ids to keep (default all).
    ``prototypes``: already-normalised (VPL) prototypes to use instead of ``normalize(weight)``."""
    if m.linear:
        logits = x @ weight.t() + bias
    else:
        w = F.normalize(weight, dim=1) if prototypes is None else prototypes
        cos = F.normalize(x, dim=1) @ w.t()
        onehot = F.one_hot(labels, weight.shape[0]).to(cos.dtype)
        target = margin_target((cos * onehot).sum(dim=1), m)
        logits = m.s * cos * (1 - onehot) + target.unsqueeze(1) * onehot
    if columns is not None:
        logits = logits[:, columns]
        labels = torch.searchsorted(columns, labels)
    return -torch.log_softmax(logits, dim=1).gather(1, labels.unsqueeze(1)).mean()


def reference_grads(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, m: Margin,
    bias: torch.Tensor | None = None, columns: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, dL/dx, dL/dW, dL/db) in float64."""
    x = x.double().clone().requires_grad_(True)
    w = weight.double().clone().requires_grad_(True)
    b = None if bias is None else bias.double().clone().requires_grad_(True)
    loss = reference_loss(x, w, labels, m, b, columns)
    loss.backward()
    return float(loss.detach()), x.grad, w.grad, None if b is None else b.grad


class ReferenceVPL:
    """The VPL memory bank for ALL classes in one process."""

    def __init__(self, memory: torch.Tensor, lambda_: float, delta_t: int, start_iter: int) -> None:
        self.memory = memory.double().clone()
        self.memory_iter = torch.full((memory.shape[0],), -1, dtype=torch.int64)
        self.lambda_, self.delta_t, self.start_iter = lambda_, delta_t, start_iter

    def prototypes(self, weight: torch.Tensor, step: int) -> torch.Tensor:
        """W̃_j = normalize((1−λ)·normalize(W_j) + λ·M_j) where fresh (t > start, t − t_j ≤ Δt, written)."""
        nw = F.normalize(weight, dim=1)
        rows = []
        for j in range(weight.shape[0]):
            fresh = step > self.start_iter and self.memory_iter[j] >= 0 and step - self.memory_iter[j] <= self.delta_t
            if fresh:
                rows.append(F.normalize((1 - self.lambda_) * nw[j] + self.lambda_ * self.memory[j], dim=0))
            else:
                rows.append(nw[j])
        return torch.stack(rows)

    def write(self, x: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        feats = F.normalize(x.detach().double(), dim=1)
        for i in range(x.shape[0]):  # batch order: the last sample of a class wins
            self.memory[labels[i]] = feats[i]
            self.memory_iter[labels[i]] = step

    def step_grads(
        self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, m: Margin, step: int,
        columns: torch.Tensor | None = None,
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One training step of the reference: loss/grads with the pre-step memory, then the write."""
        xr = x.double().clone().requires_grad_(True)
        wr = weight.double().clone().requires_grad_(True)
        loss = reference_loss(xr, wr, labels, m, columns=columns, prototypes=self.prototypes(wr, step))
        loss.backward()
        self.write(x, labels, step)
        return float(loss.detach()), xr.grad, wr.grad


# Shared test inputs ------------------------------------------------------------------------------

# Uneven local batches per world size; world 4 has an empty rank (the short last batch of an epoch).
SIZES: dict[int, list[int]] = {1: [5], 2: [4, 3], 3: [2, 4, 3], 4: [3, 5, 0, 4]}

PRESETS: dict[str, CombinedMargin] = {
    "softmax": CombinedMargin.softmax(),
    "sphereface": CombinedMargin.sphereface(),
    "sphereface_m4": CombinedMargin.sphereface(m1=4.0),
    "arcface": CombinedMargin.arcface(),
    "cosface": CombinedMargin.cosface(),
    "combined": CombinedMargin.combined(),
    "combined_m1": CombinedMargin.combined(m1=1.2, m2=0.2, m3=0.1),
}


def ref_margin(m: CombinedMargin) -> Margin:
    return Margin(s=m.s, m1=m.m1, m2=m.m2, m3=m.m3, linear=m.linear)


def global_batch(seed: int, num_classes: int, dim: int, total: int, label_range: int | None = None) -> dict[str, torch.Tensor]:
    """Float64 embeddings, labels, prototypes and bias of one global batch. Two rows point away from
    their prototype so the ArcFace fallback (θ + m > π) and the ψ branches k ≥ 1 are exercised."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, label_range or num_classes, (total,), generator=g)
    x = torch.randn(total, dim, generator=g, dtype=torch.float64) * 3.0
    for i in range(min(2, total)):
        x[i] = -weight[labels[i]] * 2.0 + 0.05 * torch.randn(dim, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(num_classes, generator=g, dtype=torch.float64)
    return {"x": x, "labels": labels, "weight": weight, "bias": bias}


def local_slice(t: torch.Tensor, rank: int, sizes: list[int]) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def rel_err(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# The reshard chain --------------------------------------------------------------------------------
# A world-size-1 run (in the test process, no torch.distributed) takes steps 1..4. Its state after
# step k−1 is resharded for the world size of step k (1→4 for step 2, then 4→2 for step 3, then
# 2→3 for step 4); that world size must reproduce step k's loss and the post-step state exactly.
RESUME: dict[str, Any] = {
    "classes": 13, "dim": 8, "seed": 3,
    "vpl": {"lambda_": 0.3, "delta_t": 2, "start_iter": 1},
    "optimizer": {"lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4},
    "world_of_step": {2: 4, 3: 2, 4: 3},
}
RESUME_SIZES = {1: [5], 2: [4, 3], 3: [2, 4, 3], 4: [3, 5, 0, 4]}


def resume_head() -> Any:
    from fr_train.heads import PartialFC, VPLConfig

    return PartialFC(RESUME["classes"], RESUME["dim"], CombinedMargin.arcface(), vpl=VPLConfig(**RESUME["vpl"]),
                     storage_dtype=torch.float64, seed=RESUME["seed"])


def resume_batch(step: int) -> dict[str, torch.Tensor]:
    world = RESUME["world_of_step"].get(step, 1)
    return global_batch(500 + step, RESUME["classes"], RESUME["dim"], sum(RESUME_SIZES[world]))


def train_head(head: Any, opt: Any, batch_of: Any, steps: int) -> tuple[list[float], list[dict[str, Any]]]:
    """Train ``head`` alone for ``steps`` steps on ``batch_of(step)`` (dicts with x, labels): the losses
    of steps 1..steps and the head's states after steps 0..steps."""
    states, losses = [head.state_dict()], []
    for step in range(1, steps + 1):
        batch = batch_of(step)
        loss = head(batch["x"], batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        states.append(head.state_dict())
    return losses, states


def resume_reference() -> tuple[list[float], list[dict[str, Any]]]:
    """Losses of steps 1..4 and the states after steps 0..4 of the world-size-1 run."""
    head = resume_head()
    return train_head(head, head.make_optimizer(**RESUME["optimizer"]), resume_batch, 4)


def resume_states_for(world: int) -> list[bytes] | None:
    """The resharded input state of the chain step that runs at ``world`` (None if none does)."""
    from fr_train.heads import reshard_head_states

    step = next((k for k, w in RESUME["world_of_step"].items() if w == world), None)
    if step is None:
        return None
    _, states = resume_reference()
    previous_world = RESUME["world_of_step"].get(step - 1, 1)
    before = reshard_head_states([states[step - 1]], previous_world)  # as written at the previous world
    return [pack(s) for s in reshard_head_states(before, world)]
