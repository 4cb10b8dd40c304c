"""Plain single-process float64 references for the sample-to-sample losses and the BCE/UNPG heads
(written straight from the formulas with Python loops, for clarity, not speed), and the shared
inputs of their tests: deterministic global batches that every rank slices the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tests.head_reference import Margin, margin_target

# Uneven local batches per world size; world 4 has an empty rank (the short last batch of an epoch).
LOSS_SIZES: dict[int, list[int]] = {1: [10], 2: [6, 4], 4: [3, 5, 0, 4]}


def pair_batch(seed: int, total: int, dim: int = 6, identities: int = 4) -> dict[str, torch.Tensor]:
    """Embeddings (not normalised) and labels with repeated identities plus one singleton identity
    (an anchor without a positive)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, identities, (total,), generator=g)
    labels[-1] = identities + 7  # a singleton: no positive in the batch
    x = torch.randn(total, dim, generator=g, dtype=torch.float64) * 2.0
    return {"x": x, "labels": labels}


def ref_triplet(x: torch.Tensor, labels: torch.Tensor, margin: float, mining: str) -> torch.Tensor:
    """FaceNet eq. 1 with ‖a − b‖² on unit vectors; batch-hard (Hermans 2017) or semi-hard (FaceNet)."""
    f = F.normalize(x, dim=1)
    n = f.shape[0]

    def d(i: int, j: int) -> torch.Tensor:
        return (f[i] - f[j]).square().sum()

    terms = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [k for k in range(n) if labels[k] != labels[a]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            d_ap = torch.stack([d(a, p) for p in pos]).max()
            d_an = torch.stack([d(a, k) for k in neg]).min()
            terms.append(torch.relu(d_ap - d_an + margin))
        else:
            for p in pos:
                d_ap = d(a, p)
                farther = [d(a, k) for k in neg if d(a, k) > d_ap]
                d_an = torch.stack(farther).min() if farther else torch.stack([d(a, k) for k in neg]).max()
                terms.append(torch.relu(d_ap - d_an + margin))
    return torch.stack(terms).mean() if terms else f.sum() * 0.0


def ref_contrastive(x: torch.Tensor, labels: torch.Tensor, margin: float, pos_weight: float) -> torch.Tensor:
    """Hadsell eq. 4 on cosines, mean over unordered pairs i < j."""
    f = F.normalize(x, dim=1)
    n = f.shape[0]
    terms = []
    for i in range(n):
        for j in range(i + 1, n):
            c = f[i] @ f[j]
            if labels[i] == labels[j]:
                terms.append(pos_weight * (1.0 - c) ** 2)
            else:
                terms.append(torch.clamp(c - margin, min=0.0) ** 2)
    return torch.stack(terms).mean() if terms else f.sum() * 0.0


def ref_bce(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, m: Margin, lam: float,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """UniFace BCE with one unified bias b: per sample
    ``log(1 + e^{−(s·g(cos_y) − b)}) + λ·Σ_{j ≠ y, j sampled} log(1 + e^{s·cos_j − b})``, batch mean."""
    f = F.normalize(x, dim=1)
    w = F.normalize(weight, dim=1)
    cols = range(weight.shape[0]) if columns is None else [int(c) for c in columns]
    losses = []
    for i in range(f.shape[0]):
        y = int(labels[i])
        total = F.softplus(-(margin_target(f[i] @ w[y], m) - bias))
        for j in cols:
            if j != y:
                total = total + lam * F.softplus(m.s * (f[i] @ w[j]) - bias)
        losses.append(total)
    return torch.stack(losses).mean()


def box_whisker_keep(values: torch.Tensor, whisker: float) -> torch.Tensor:
    """Mask of values within [Q1 − w·IQR, Q3 + w·IQR], quartiles by linear interpolation (numpy's
    default, torch.quantile's 'linear')."""
    q1, q3 = torch.quantile(values, 0.25), torch.quantile(values, 0.75)
    iqr = q3 - q1
    return (values >= q1 - whisker * iqr) & (values <= q3 + whisker * iqr)


def ref_unpg(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, m: Margin, whisker: float,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """UNPG: softmax CE over [margin class logits, s·cos of the filtered in-batch negative pairs],
    the pair columns appended to every row (seed 001; REFERENCES.md). Filtering is not differentiated."""
    f = F.normalize(x, dim=1)
    w = F.normalize(weight, dim=1)
    n = f.shape[0]
    pair_cos = [f[i] @ f[j] for i in range(n) for j in range(i + 1, n) if labels[i] != labels[j]]
    extra = torch.zeros(0, dtype=f.dtype)
    if pair_cos:
        cosines = torch.stack(pair_cos)
        extra = m.s * cosines[box_whisker_keep(cosines.detach(), whisker)]
    cols = list(range(weight.shape[0])) if columns is None else [int(c) for c in columns]
    losses = []
    for i in range(n):
        y = int(labels[i])
        logits = [margin_target(f[i] @ w[j], m) if j == y else m.s * (f[i] @ w[j]) for j in cols]
        row = torch.cat([torch.stack(logits), extra])
        losses.append(-torch.log_softmax(row, dim=0)[cols.index(y)])
    return torch.stack(losses).mean()


def grads_of(fn, *tensors: torch.Tensor) -> tuple[float, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
    """(value, gradients) of ``fn(*tensors)`` in float64."""
    leaves = [t.double().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return float(value.detach()), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]


def uniface_bias_init(num_classes: int, r: float) -> float:
    return math.log(num_classes * r * 10)


def ref_uss_memory(x: torch.Tensor, labels: torch.Tensor, memory: dict[int, torch.Tensor]) -> None:
    """Write normalised features into the class memory in batch order (the last sample of a class wins)."""
    f = F.normalize(x.detach(), dim=1)
    for i in range(f.shape[0]):
        memory[int(labels[i])] = f[i]


def ref_uss_bias_init(x: torch.Tensor, labels: torch.Tensor, s: float, memory: dict[int, torch.Tensor],
                      columns: list[int]) -> float:
    """Mean over samples with any negative of ``logsumexp_{c≠y, c in memory}(s·cos(x, M_c))``."""
    f = F.normalize(x.detach(), dim=1)
    values = []
    for i in range(f.shape[0]):
        neg = [s * (f[i] @ memory[c]) for c in columns if c in memory and c != int(labels[i])]
        if neg:
            values.append(torch.logsumexp(torch.stack(neg), dim=0))
    return float(torch.stack(values).mean())


def ref_uss(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, m: Margin,
    memory: dict[int, torch.Tensor], uss_margin: float, uss_weight: float, columns: list[int],
) -> torch.Tensor:
    """CE(margin softmax over ``columns``) + weight·mean_i [softplus(−(s(cos(x_i, M_y) − m) − b))
    + Σ_{c≠y} softplus(s·cos(x_i, M_c) − b)], classes without memory skipped (UniTSFace)."""
    from tests.head_reference import reference_loss

    ce = reference_loss(x, weight, labels, m, columns=torch.tensor(columns))
    f = F.normalize(x, dim=1)
    terms = []
    for i in range(f.shape[0]):
        y = int(labels[i])
        total = f[i].sum() * 0.0
        for c in columns:
            if c not in memory:
                continue
            c_cos = f[i] @ memory[c]
            if c == y:
                total = total + F.softplus(-(m.s * (c_cos - uss_margin) - bias))
            else:
                total = total + F.softplus(m.s * c_cos - bias)
        terms.append(total)
    return ce + uss_weight * torch.stack(terms).mean()


def ref_epl_update(memory: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> None:
    """In place: each sample's candidate from the PRE-step prototype, ``f = softsign(⟨P_y, x⟩)``,
    ``normalize(f·P_y + (1 − f)·x)``; the last sample of a class in batch order wins."""
    before = memory.clone()
    f = F.normalize(x.detach(), dim=1)
    for i in range(f.shape[0]):
        c = int(labels[i])
        fac = F.softsign(before[c] @ f[i])
        memory[c] = F.normalize(fac * before[c] + (1 - fac) * f[i], dim=0)


def ref_epl(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, m: Margin, memory: torch.Tensor, k: float,
    active: bool, columns: list[int],
) -> torch.Tensor:
    """Mean over 2B rows: margin CE against W, and CE of s·cos(x, P) with the target reduced by the
    constant k·cos(x, P_y) (EPL, official CosFace_EPL); the first half only when not active."""
    from tests.head_reference import reference_loss

    cols = torch.tensor(columns)
    ce = reference_loss(x, weight, labels, m, columns=cols)
    if not active:
        return ce
    f = F.normalize(x, dim=1)
    protos = F.normalize(memory, dim=1)
    losses = []
    for i in range(f.shape[0]):
        y = int(labels[i])
        row = []
        for c in columns:
            cos = f[i] @ protos[c]
            row.append(m.s * (cos - k * cos.detach()) if c == y else m.s * cos)
        losses.append(-torch.log_softmax(torch.stack(row), dim=0)[columns.index(y)])
    return 0.5 * (ce + torch.stack(losses).mean())


def ref_distill(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, weights: dict[str, float],
                anchors: tuple[int, ...], state: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Feature distillation + EKD over one batch, pair by pair (fr_train/losses/distill.py's formulas).
    ``state`` holds the EMA thresholds ("student", "teacher"; None before the first batch) and is
    updated as the loss does in training."""
    f, g = F.normalize(x, dim=1), F.normalize(t.detach(), dim=1)
    n = f.shape[0]
    feature = sum(((f[i] - g[i]).square().sum() for i in range(n)), torch.zeros((), dtype=x.dtype)) / n
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    pos = [(i, j) for i, j in pairs if labels[i] == labels[j]]
    neg = [(i, j) for i, j in pairs if labels[i] != labels[j]]

    def s(i: int, j: int) -> torch.Tensor:
        return f[i] @ f[j]

    def tt(i: int, j: int) -> float:
        return float(g[i] @ g[j])

    def at_fpr(values: list[float]) -> torch.Tensor:
        ordered = sorted(values, reverse=True)
        return torch.tensor([ordered[min(len(ordered) // a, len(ordered) - 1)] for a in anchors], dtype=torch.float64)

    cur_s, cur_t = at_fpr([float(s(i, j)) for i, j in neg]), at_fpr([tt(i, j) for i, j in neg])
    m = weights["momentum"] if state["student"] is not None else 1.0
    state["student"] = cur_s if state["student"] is None else (1 - m) * state["student"] + m * cur_s
    state["teacher"] = cur_t if state["teacher"] is None else (1 - m) * state["teacher"] + m * cur_t

    def rank(c: torch.Tensor | float, tau: torch.Tensor) -> torch.Tensor:
        return sum(torch.sigmoid((c - tau[a]) / weights["temperature"]) for a in range(len(anchors)))

    def gap(i: int, j: int) -> torch.Tensor:
        return (rank(s(i, j), state["student"]) - rank(tt(i, j), state["teacher"])).square()

    hardest = sorted(neg, key=lambda p: float(s(*p)), reverse=True)[: int(weights["topk"])]
    ekd_pos = sum((gap(i, j) for i, j in pos), torch.zeros((), dtype=x.dtype)) / max(len(pos), 1)
    ekd_neg = sum((gap(i, j) for i, j in hardest), torch.zeros((), dtype=x.dtype)) / max(len(hardest), 1)
    return weights["feature"] * feature + weights["ekd_pos"] * ekd_pos + weights["ekd_neg"] * ekd_neg
