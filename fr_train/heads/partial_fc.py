"""The sharded prototype head: Partial FC with combined margins and optional VPL.

One rank's step (DESIGN.md "The sharded head"):
1. exchange local batch sizes and input checks with every rank (all ranks raise together);
2. normalise local embeddings and all-gather them with the labels (uneven sizes padded);
3. sample this shard's rows: every positive it owns + uniform negatives (sampling.py);
4. prototypes ``normalize(W[idx])`` (VPL: mixed with the memory bank, vpl.py);
5. distributed margin softmax cross-entropy (cross_entropy.py) → global-batch mean loss,
   identical on every rank;
6. training + VPL: write the memory bank rows of the owned classes (after the logits of this step
   were formed, so step t's logits use the memory of steps < t).

Compact state (opt-in, heads/compact.py): ``momentum_dtype=torch.float8_e4m3fn`` keeps the SGD
momentum rows as fp8 + a float32 scale per row, ``memory_dtype=torch.float8_e4m3fn`` the VPL bank
likewise (buffers ``vpl_memory`` fp8, ``vpl_memory_scale`` float32) with int32 timestamps. The
defaults (None) keep the storage dtype and int64 timestamps, exactly as before.

Gradient contract: ``loss.backward()`` on every rank gives rank r exactly ``dL/d(its embeddings)``
and ``dL/d(its shard)``, where L is the global mean loss (each shard's contribution to an
embedding's gradient is summed over ranks once, by the gather's reduce-scatter). The backbone is
data-parallel: its true gradient is the SUM of the ranks' backbone gradients, so when DeepSpeed/DDP
AVERAGE them, pass ``scale_backbone_grad(embeddings, world_size)`` to the head (or multiply the
backbone's averaged gradient by W). The head's own parameters are never averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fr_train.heads.compact import (
    FP8,
    TIMESTAMP_DTYPE,
    TIMESTAMP_MAX,
    check_compact_dtype,
    dequantize_rows,
    quantize_rows,
)
from fr_train.heads.margin import CombinedMargin
from fr_train.heads.optim import RowSparseAdamW, RowSparseSGD
from fr_train.heads.prototypes import CHUNK_ROWS, SampledPrototypes, prototype_margin_ce
from fr_train.heads.sampling import ClassSampler, sampler_seed
from fr_train.heads.vpl import NEVER_WRITTEN, VPLConfig, fresh_rows, write_latest
from fr_train.parallel.collectives import exchange_meta, gather_rows, gather_rows_nograd
from fr_train.parallel.sharding import SPLIT_RULE, class_shard, host_copies, resolve_group

STATE_FORMAT = "fr_train.heads.PartialFC/1"
_INIT_BLOCK = 4096  # classes per init block: the initial weights do not depend on the world size


def _block_init(
    class_start: int, num_local: int, dim: int, seed: int, salt: int, std: float | None,
    dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    """Rows ``[class_start, class_start+num_local)`` of a ``C × dim`` init drawn in fixed class blocks
    (seeded by block), so a class gets the same initial row whatever the world size.
    ``std=None``: random unit rows (VPL memory), else N(0, std²) (insightface's head init)."""
    out = torch.empty(num_local, dim, dtype=dtype, device=device)
    end = class_start + num_local
    gen = torch.Generator(device=device)
    for block in range(class_start // _INIT_BLOCK, math.ceil(end / _INIT_BLOCK)):
        lo, hi = block * _INIT_BLOCK, (block + 1) * _INIT_BLOCK
        gen.manual_seed(sampler_seed(seed * 7 + salt, block))
        rows = torch.randn(_INIT_BLOCK, dim, generator=gen, device=device, dtype=torch.float32)
        rows = F.normalize(rows, dim=1) if std is None else rows * std
        a, b = max(lo, class_start), min(hi, end)
        out[a - class_start : b - class_start] = rows[a - lo : b - lo].to(dtype)
    return out


@dataclass(frozen=True)
class SampledStep:
    """One step's shared tensors: ``x`` [B, D] global batch (normalised unless the margin is linear;
    gradient reduce-scattered to the owners), ``labels`` [B]; ``prototypes``: this shard's sampled
    columns (prototypes.py), whose ``w`` [S, D] (gradient to ``weight`` rows) and ``bias`` [S]
    (softmax preset only) are built through autograd on first use; ``target_col`` [B]: column of each
    row's class, −1 where another rank owns it; ``sizes``: local batch sizes; ``start``: this rank's
    first row in ``x``; ``owned``/``local_labels``: the rows whose class this rank owns and those
    classes' local indices."""

    x: torch.Tensor
    labels: torch.Tensor
    prototypes: SampledPrototypes
    target_col: torch.Tensor
    sizes: list[int]
    start: int
    owned: torch.Tensor
    local_labels: torch.Tensor
    iteration: int

    @cached_property
    def _built(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.prototypes.full()

    @property
    def w(self) -> torch.Tensor:
        return self._built[0]

    @property
    def bias(self) -> torch.Tensor | None:
        return self._built[1]


class PartialFC(nn.Module):
    """This rank's shard of a ``num_classes``-way margin-softmax head with Partial-FC sampling.

    ``forward(embeddings [b_local, D], labels [b_local])`` → global-batch mean loss (same on every
    rank). After ``backward`` ``weight.grad`` is dense at ``sample_rate == 1`` and a sparse COO tensor
    with the sampled rows otherwise. ``last_sampled_classes`` holds the global class ids used by this
    rank in the last forward. Training-mode forwards advance ``iteration`` (the VPL step t, 1-based)
    and sample; eval-mode forwards use every row and change no state. ``momentum_dtype`` /
    ``memory_dtype``: None (the storage dtype) or ``torch.float8_e4m3fn`` (compact state, module doc).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A checkpoint takes live_state() (the save path's staging copies it); a subclass adding state
        # in state_dict() alone would lose it from every training checkpoint without a word.
        super().__init_subclass__(**kwargs)
        if "state_dict" in vars(cls) and "live_state" not in vars(cls):
            raise TypeError(f"{cls.__name__} overrides state_dict() but not live_state(): extend live_state() "
                            "(state_dict() is its host copy, and checkpoints save live_state())")

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: CombinedMargin,
        sample_rate: float = 1.0,
        group: dist.ProcessGroup | None = None,
        vpl: VPLConfig | None = None,
        *,
        seed: int = 0,
        storage_dtype: torch.dtype = torch.float32,
        matmul_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        init_std: float = 0.01,
        momentum_dtype: torch.dtype | None = None,
        memory_dtype: torch.dtype | None = None,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        super().__init__()
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if vpl is not None and margin.linear:
            raise ValueError("VPL mixes normalised prototypes with normalised features; it needs a normalised "
                             "margin (ArcFace/CosFace/SphereFace/combined), not CombinedMargin.softmax()")
        if storage_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"storage_dtype must be a floating dtype, got {storage_dtype}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        check_compact_dtype("momentum_dtype", momentum_dtype)
        check_compact_dtype("memory_dtype", memory_dtype)
        if memory_dtype is not None and vpl is None:
            raise ValueError("memory_dtype sets the VPL memory bank's dtype, but this head has no VPL (vpl=None)")
        self.comm = resolve_group(group)
        shard = class_shard(num_classes, self.comm.world_size, self.comm.rank)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.class_start, self.num_local = shard.class_start, shard.num_local
        self.margin, self.sample_rate, self.vpl, self.seed = margin, sample_rate, vpl, seed
        self.matmul_dtype, self.chunk_rows = matmul_dtype, chunk_rows
        self.momentum_dtype, self.memory_dtype = momentum_dtype, memory_dtype
        dev = torch.device(device) if device is not None else torch.device("cpu")

        self.weight = nn.Parameter(
            _block_init(self.class_start, self.num_local, embedding_size, seed, 1, init_std, storage_dtype, dev)
        )
        self.bias: nn.Parameter | None
        if margin.linear:
            self.bias = nn.Parameter(torch.zeros(self.num_local, dtype=storage_dtype, device=dev))
        else:
            self.register_parameter("bias", None)
        if vpl is not None and memory_dtype == FP8:
            # The same random unit rows as the full-precision bank, quantised (compact.py) a block of
            # rows at a time: a float32 bank of the whole shard first would be 2 KB per class (61 GB
            # at 30M classes) at construction, the peak that decides whether the head fits.
            memory = torch.empty(self.num_local, embedding_size, dtype=FP8, device=dev)
            scale = torch.empty(self.num_local, dtype=torch.float32, device=dev)
            for lo in range(0, self.num_local, _INIT_BLOCK * 16):
                n = min(_INIT_BLOCK * 16, self.num_local - lo)
                rows = _block_init(self.class_start + lo, n, embedding_size, seed, 2, None, torch.float32, dev)
                q, scale[lo : lo + n] = quantize_rows(rows)
                memory.view(torch.uint8)[lo : lo + n] = q.view(torch.uint8)
            self.register_buffer("vpl_memory", memory)
            self.register_buffer("vpl_memory_scale", scale)
            self.register_buffer("vpl_memory_iter",
                                 torch.full((self.num_local,), NEVER_WRITTEN, dtype=TIMESTAMP_DTYPE, device=dev))
        elif vpl is not None:
            memory = _block_init(self.class_start, self.num_local, embedding_size, seed, 2, None, storage_dtype, dev)
            self.register_buffer("vpl_memory", memory)
            self.register_buffer("vpl_memory_iter", torch.full((self.num_local,), NEVER_WRITTEN, dtype=torch.int64, device=dev))
        self.iteration = 0
        self.sampler = ClassSampler(self.num_local, sample_rate, seed, self.comm.rank, dev)
        self.last_sampled_classes: torch.Tensor | None = None
        self.last_vpl_injected: torch.Tensor | None = None
        self.optimizer: RowSparseSGD | RowSparseAdamW | None = None

    @property
    def class_end(self) -> int:
        return self.class_start + self.num_local

    @property
    def compact_memory(self) -> bool:
        return self.vpl is not None and self.memory_dtype == FP8

    def _row_names(self) -> list[str]:
        """The per-class tensors of ``state_dict()["rows"]`` (reshard.py splits each by class)."""
        names = ["weight"] + (["bias"] if self.bias is not None else [])
        if self.vpl is not None:
            names += ["vpl_memory"] + (["vpl_memory_scale"] if self.compact_memory else []) + ["vpl_memory_iter"]
        return names

    def _memory_rows(self, idx: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The VPL bank rows ``idx`` (all if None), in ``dtype`` (dequantised when compact)."""
        memory = self.vpl_memory if idx is None else self.vpl_memory.index_select(0, idx)
        if not self.compact_memory:
            return memory
        scale = self.vpl_memory_scale if idx is None else self.vpl_memory_scale.index_select(0, idx)
        return dequantize_rows(memory, scale, dtype)

    def _prototypes(self, idx: torch.Tensor | None, compute_dtype: torch.dtype, step: int) -> SampledPrototypes:
        """This step's columns (prototypes.py). With VPL, what rebuilding them in backward needs from
        the bank is read NOW, before forward writes this step's features into it: the sampled rows'
        timestamps and the memory rows of the columns that inject it."""
        protos = SampledPrototypes(self.weight, self.bias, idx, not self.margin.linear, compute_dtype, step,
                                   chunk_rows=self.chunk_rows)
        if self.vpl is None:
            return protos
        memory_iter = self.vpl_memory_iter.clone() if idx is None else self.vpl_memory_iter.index_select(0, idx)
        protos.vpl, protos.memory_iter = self.vpl, memory_iter
        if step > self.vpl.start_iter and self.vpl.lambda_ != 0.0:
            fresh_cols = torch.nonzero(fresh_rows(self.vpl, memory_iter, step)).squeeze(1)  # a host sync
            rows = self._memory_rows(fresh_cols if idx is None else idx[fresh_cols], compute_dtype)
            protos.fresh_memory = torch.cat([rows.new_zeros(1, rows.shape[1]), rows.detach().to(compute_dtype)])
            slot = torch.zeros_like(memory_iter, dtype=torch.int64)
            slot[fresh_cols] = torch.arange(1, fresh_cols.numel() + 1, device=slot.device)
            protos.memory_slot = slot
        return protos

    # Forward -------------------------------------------------------------------------------------
    def _check_and_sizes(self, embeddings: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Exchange local sizes and input checks; every rank raises the same error on bad input."""
        shape_ok = embeddings.dim() == 2 and embeddings.shape[1] == self.embedding_size
        labels_ok = (
            labels.dim() == 1 and embeddings.dim() >= 1 and labels.shape[0] == embeddings.shape[0]
            and not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool
        )
        n = embeddings.shape[0] if embeddings.dim() >= 1 else 0
        bad_labels = nonfinite = 0
        lo = hi = 0
        if labels_ok and labels.numel():
            out_of_range = (labels < 0) | (labels >= self.num_classes)
            bad_labels = int(out_of_range.sum())
            if bad_labels:
                lo, hi = int(labels[out_of_range].min()), int(labels[out_of_range].max())
        if shape_ok and embeddings.numel():
            nonfinite = int((~torch.isfinite(embeddings)).any(dim=1).sum())
        dim = embeddings.shape[-1] if embeddings.dim() >= 1 else -1
        meta = torch.tensor(
            [n, embeddings.dim(), dim, int(labels_ok), bad_labels, lo, hi, nonfinite],
            dtype=torch.int64, device=embeddings.device,
        )
        table = exchange_meta(self.comm, meta).tolist()
        problems = []
        for r, (rn, rdims, rdim, rlab_ok, rbad, rlo, rhi, rnonfinite) in enumerate(table):
            if rdims != 2 or rdim != self.embedding_size:
                problems.append(f"rank {r}: embeddings must be [batch, {self.embedding_size}] "
                                f"(head embedding_size), got {rdims}-d with last dim {rdim}")
            if not rlab_ok:
                problems.append(f"rank {r}: labels must be a 1-d integer tensor with one label per embedding row "
                                f"({rn} rows)")
            if rbad:
                problems.append(f"rank {r}: {rbad} label(s) outside [0, {self.num_classes}) (range seen {rlo}..{rhi}); "
                                "check the dataset's class count against the head's num_classes")
            if rnonfinite:
                problems.append(f"rank {r}: {rnonfinite} embedding row(s) contain NaN or inf; the backbone diverged "
                                "(lower the LR, check the loss scale) or the input batch is corrupt")
        if problems:
            raise ValueError("PartialFC.forward: bad input:\n  " + "\n  ".join(problems))
        sizes = [row[0] for row in table]
        if sum(sizes) == 0:
            raise ValueError("PartialFC.forward: the global batch is empty on every rank")
        return sizes

    def prepare(self, embeddings: torch.Tensor, labels: torch.Tensor) -> SampledStep:
        """The front half of a step, shared by every loss on this head: checks, normalise and
        all-gather, advance the iteration (training), sample this shard's rows, (normalised, VPL-
        injected) prototypes. Sets ``last_sampled_classes`` (and ``last_vpl_injected``)."""
        sizes = self._check_and_sizes(embeddings, labels)
        compute_dtype = torch.float64 if torch.float64 in (embeddings.dtype, self.weight.dtype) else torch.float32
        x_local = embeddings.to(compute_dtype)
        if not self.margin.linear:
            x_local = F.normalize(x_local, dim=1)
        x = gather_rows(self.comm, x_local, sizes)
        y = gather_rows_nograd(self.comm, labels.to(torch.int64), sizes)

        if self.training:
            if self.compact_memory and self.iteration >= TIMESTAMP_MAX:
                raise ValueError(f"PartialFC: step {self.iteration + 1} does not fit the int32 VPL timestamps of "
                                 "head.vpl_memory_dtype=float8_e4m3fn; resume with head.vpl_memory_dtype=storage")
            self.iteration += 1
        step = self.iteration
        owned = torch.nonzero((y >= self.class_start) & (y < self.class_end)).squeeze(1)
        local_labels = y[owned] - self.class_start
        idx = self.sampler.sample(torch.unique(local_labels), step) if self.training else None

        cols = local_labels if idx is None else torch.searchsorted(idx, local_labels)
        prototypes = self._prototypes(idx, compute_dtype, step)
        if self.vpl is not None:
            # Fraction of this rank's prototypes in the step that were variational (a 0-d tensor:
            # reading it is the caller's choice; the step's own host syncs are the input checks'
            # exchange, the batch's unique classes and, with VPL injecting, the fresh columns).
            self.last_vpl_injected = prototypes.injected_fraction()

        target_col = torch.full_like(y, -1)
        target_col[owned] = cols
        sampled = torch.arange(self.num_local, device=y.device) if idx is None else idx
        self.last_sampled_classes = sampled + self.class_start
        return SampledStep(x=x, labels=y, prototypes=prototypes, target_col=target_col, sizes=sizes,
                           start=sum(sizes[: self.comm.rank]), owned=owned, local_labels=local_labels,
                           iteration=step)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = self.prepare(embeddings, labels)
        loss = prototype_margin_ce(s.x, s.prototypes, s.target_col, self.margin, self.comm, self.matmul_dtype)
        if self.training and self.vpl is not None:
            write_latest(self.vpl_memory, self.vpl_memory_iter, s.local_labels, s.x[s.owned].detach(), s.iteration,
                         scale=self.vpl_memory_scale if self.compact_memory else None)
        return loss

    # Optimizer -----------------------------------------------------------------------------------
    def step_stats(self) -> dict[str, float]:
        """What the last training step did, for the step record and the metrics (the interface every
        head and pair loss offers the trainer): sampled classes on this rank, VPL's injected fraction."""
        stats: dict[str, float] = {}
        if self.last_sampled_classes is not None:
            stats["sampled_classes"] = float(self.last_sampled_classes.numel())
        if self.last_vpl_injected is not None:
            stats["vpl_injected_fraction"] = float(self.last_vpl_injected)
        return stats

    def make_optimizer(
        self,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        kind: Literal["sgd", "adamw"] = "sgd",
        *,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        state_dtype: torch.dtype | None = None,
    ) -> RowSparseSGD | RowSparseAdamW:
        """The head's own row-sparse optimizer (kept in ``self.optimizer`` and in ``state_dict``).
        Drive its LR with ``opt.param_groups[0]["lr"] = lr`` or any torch LR scheduler. The row state's
        dtype: ``state_dtype`` if given, else the head's ``momentum_dtype`` (None: the storage dtype)."""
        if state_dtype is None:
            state_dtype = self.momentum_dtype
        params = [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None else [])
        if kind == "sgd":
            opt: RowSparseSGD | RowSparseAdamW = RowSparseSGD(params, lr, momentum, weight_decay, nesterov, state_dtype)
        elif kind == "adamw":
            opt = RowSparseAdamW(params, lr, betas, eps, weight_decay, state_dtype)
        else:
            raise ValueError(f"optimizer kind must be 'sgd' or 'adamw', got {kind!r}")
        self.optimizer = opt
        return opt

    # State ---------------------------------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """Shard + global facts + optimizer rows + VPL bank + step counter + sampler RNG (reshardable):
        a private host copy of :meth:`live_state`."""
        if args or kwargs:
            raise TypeError("PartialFC is model-parallel (each rank holds a different shard): save it with "
                            "head.state_dict() on its own, not nested in another module's state_dict")
        return host_copies(self.live_state())

    def live_state(self) -> dict[str, Any]:
        """What :meth:`state_dict` holds, with the head's own tensors (detached, not copied): for a
        caller that copies every tensor before the next step changes them — a checkpoint's staging
        buffers (checkpointing/stateful.py), which are then the only host copy of a save. Heads that
        keep more state extend this method, not ``state_dict``."""
        rows = {name: getattr(self, name).detach() for name in self._row_names()}
        optimizer = None
        if self.optimizer is not None:
            optimizer = {
                "kind": self.optimizer.kind,
                "hyper": {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"},
                "rows": {n: {k: v.detach() for k, v in s.items()} for n, s in self.optimizer.row_state().items()},
            }
        return {
            "format": STATE_FORMAT,
            "num_classes": self.num_classes,
            "embedding_size": self.embedding_size,
            "split_rule": SPLIT_RULE,
            "world_size": self.comm.world_size,
            "rank": self.comm.rank,
            "class_start": self.class_start,
            "num_local": self.num_local,
            "margin": self.margin.to_dict(),
            "sample_rate": self.sample_rate,
            "vpl": None if self.vpl is None else self.vpl.to_dict(),
            "seed": self.seed,
            "iteration": self.iteration,
            "sampler_rng": self.sampler.state(),
            "rows": rows,
            "optimizer": optimizer,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False) -> None:  # type: ignore[override]
        """Load a shard written by :meth:`state_dict` (or :func:`reshard_head_states`). Refuses a state
        for another class count, embedding size, world size or class range, naming the field."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"head state: field 'format' is {state.get('format')!r}, expected {STATE_FORMAT!r}")
        expect = {
            "num_classes": self.num_classes, "embedding_size": self.embedding_size,
            "world_size": self.comm.world_size, "rank": self.comm.rank,
            "class_start": self.class_start, "num_local": self.num_local,
        }
        for field, mine in expect.items():
            if state.get(field) != mine:
                hint = (" (use fr_train.heads.reshard_head_states to re-split a checkpoint for another world size)"
                        if field in ("world_size", "rank", "class_start", "num_local") else "")
                raise ValueError(f"head state: field {field!r} is {state.get(field)!r}, this head has {mine!r}{hint}")
        rows = state["rows"]
        wanted = set(self._row_names())
        if strict and set(rows) != wanted:
            raise ValueError(f"head state: field 'rows' holds {sorted(rows)}, this head needs {sorted(wanted)} "
                             "(a softmax head has a bias, a VPL head a memory bank, a compact VPL bank a scale)")
        if self.vpl is not None and "vpl_memory" in rows and (rows["vpl_memory"].dtype == FP8) != self.compact_memory:
            raise ValueError(f"head state: rows['vpl_memory'] is {rows['vpl_memory'].dtype}, this head keeps "
                             f"{self.vpl_memory.dtype}: the checkpoint was written with another head.vpl_memory_dtype; "
                             "resume with the same one")
        with torch.no_grad():
            targets = {name: getattr(self, name) for name in wanted}
            for name in wanted & set(rows):
                if rows[name].shape != targets[name].shape:
                    raise ValueError(f"head state: rows[{name!r}] has shape {tuple(rows[name].shape)}, "
                                     f"expected {tuple(targets[name].shape)}")
                targets[name].copy_(rows[name])
        self.iteration = int(state["iteration"])
        # Resharded states carry no RNG stream: reseed from (seed, iteration, rank) so the new run
        # does not replay the first steps' samples.
        self.sampler.load_state(state.get("sampler_rng"), self.iteration)
        opt_state = state.get("optimizer")
        if opt_state is not None:
            if self.optimizer is None:
                raise ValueError("head state carries optimizer rows but the head has no optimizer: call "
                                 "head.make_optimizer(...) before head.load_state_dict(...)")
            if opt_state["kind"] != self.optimizer.kind:
                raise ValueError(f"head state: field 'optimizer.kind' is {opt_state['kind']!r}, "
                                 f"the head's optimizer is {self.optimizer.kind!r}")
            self.optimizer.load_row_state(opt_state["rows"])
        elif strict and self.optimizer is not None:
            raise ValueError("head state has no optimizer state but the head has an optimizer; pass strict=False "
                             "to start the optimizer from zero")
