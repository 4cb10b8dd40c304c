"""One typed configuration tree for a run, the method presets, and validated overrides.

Why one tree: the resolved config is printed at start, saved with the run and compared on
resume, so every knob that changes results lives here, with its default visible, and nothing
is read from the environment behind the user's back. Overrides (`--set a.b=v`, a TOML file)
are checked against the tree: an unknown key or a bad value is an error listing what is valid.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_pipeline.synthetic import SyntheticConfig
from fr_train.methods import METHODS


class ConfigError(ValueError):
    """A configuration key or value the user gave is not valid; the message says what is."""


@dataclass
class DataConfig:
    path: str | None = None
    """Directory with train.rec/train.idx/property (insightface layout). None: synthetic default."""
    batch_size: int = 128
    """Images per rank per step (the global batch is batch_size × world size)."""
    num_threads: int = 2
    """DALI CPU threads per rank."""
    shuffle_buffer: int = 16384
    """DALI reader `initial_fill`: the size of the random shuffle buffer."""
    last_batch: Literal["drop"] = "drop"
    """Training drops each rank's incomplete last batch (a different random remainder each epoch):
    padded samples would be counted twice by the loss."""
    sampler: Literal["shuffle", "global", "pk"] = "shuffle"
    """shuffle: DALI's reader, a shard per rank with its shuffle window; global: one seeded permutation
    of all images per epoch, the same global batches at any world size (data_pipeline/scheduled.py;
    needed by elastic runs); pk: global batches of P identities × K images (data.pk_images_per_identity),
    for the sample-to-sample losses (data_pipeline/pk_sampler.py), also world-size independent."""
    pk_images_per_identity: int = 4
    """K of the pk sampler; P = global batch / K."""
    cache_dir: str = "~/.cache/fr_train"
    """Where the synthetic default is built and cached."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The embedded default dataset, used when `path` is None: the generator's own config
    (data_pipeline/synthetic.py), so that its keys and their validity are defined once."""


@dataclass
class BackboneConfig:
    name: str = "r50"
    embedding_size: int = 512
    dropout: float = 0.0
    freeze_bn: bool = False
    """BatchNorm normalises with its running statistics in training too and never updates them (the
    affine parameters train): steps then do not depend on how the global batch is split over workers
    and micro-batches (fr_train/backbones/norm.py). For fine-tuning, and exact elastic runs."""


@dataclass
class HeadConfig:
    """The sharded prototype head (DESIGN.md, "The sharded head") and its margin."""

    margin: Literal["softmax", "sphereface", "cosface", "arcface", "combined"] = "arcface"
    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    sample_rate: float = 1.0
    vpl: bool = False
    vpl_lambda: float = 0.15
    vpl_delta_t: int = 200
    vpl_start_iter: int = 8000
    """Iteration after which VPL injects memory; scale it down for short runs."""
    loss: Literal["margin_softmax", "bce", "unpg", "uss", "epl", "triplet", "contrastive"] = "margin_softmax"
    """What the head optimises: the margin softmax over sharded prototypes (default), a seed
    method on the same sharded prototypes (bce, unpg, uss, epl), or a sample-to-sample loss over
    the global batch with no prototypes (triplet, contrastive)."""
    bce_neg_weight: float = 1.0
    bce_bias_ratio: float = 1.0
    """BCE's bias starts at log(C·bias_ratio·10) (UniFace)."""
    unpg_whisker: float = 1.5
    """UNPG keeps in-batch negative cosines within [Q1 − w·IQR, Q3 + w·IQR]."""
    uss_margin: float = 0.1
    uss_weight: float = 1.0
    uss_start_epoch: int = 1
    """USS joins the CosFace loss after this many epochs (UniTSFace: after the first)."""
    epl_k: float = 0.7
    epl_start_epoch: int = 3
    """EPL adds its empirical-prototype rows after this many epochs (official code: from epoch 4)."""
    pair_margin: float = 0.2
    triplet_mining: Literal["batch_hard", "semi_hard"] = "batch_hard"
    contrastive_pos_weight: float = 1.0
    storage_dtype: Literal["float32", "bfloat16"] = "float32"
    """bf16 storage of prototypes and memory fits ~2x more classes per GPU."""
    momentum_dtype: Literal["storage", "float8_e4m3fn"] = "storage"
    """The head's SGD momentum rows: in storage_dtype, or fp8 + a float32 scale per row (516 B per class
    at 512-d instead of 1,024 in bf16; heads/compact.py says why a running average tolerates it)."""
    vpl_memory_dtype: Literal["storage", "float8_e4m3fn"] = "storage"
    """The VPL memory bank: in storage_dtype with int64 timestamps, or fp8 + a float32 scale per row with
    int32 timestamps (520 B per class instead of 1,032 in bf16). With bf16 storage and both keys at
    float8_e4m3fn a VPL head keeps 2,060 B per class (3,080 with both at storage)."""
    seed: int = 1234
    """Seed of the negative sampler (offset by rank)."""


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    """Learning rate at `base_batch` global batch; scaled linearly to the actual global batch."""
    base_batch: int = 1024
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad_norm: float = 5.0
    """Backbone gradient clipping (0 disables)."""


@dataclass
class ScheduleConfig:
    epochs: int = 20
    max_steps: int = 0
    """Stop after this many steps (0: run `epochs` epochs)."""
    warmup_steps: int = 0
    power: float = 1.0
    """Polynomial decay power after warmup (insightface: 1, linear)."""


@dataclass
class EvalConfig:
    enabled: bool = True
    """Evaluate at step 0, every `every_steps` and at the end (false: never)."""
    every_steps: int = 2000
    """Evaluate every N steps (0: only at the end)."""
    sets: list[str] = field(default_factory=list)
    """Names (looked up as DATA/NAME.bin) or paths of .bin verification sets; empty: the
    dataset's own `*.bin` files (the synthetic default ships `synth_val.bin`)."""
    batch_size: int = 64
    ijb: str = ""
    """An IJB-B/C release directory (insightface's layout, as `fr_eval --ijb`): the final model is scored
    on it on rank 0 at the end of the run (1:1 TAR@FAR, 1:N), into train_log.jsonl, Prometheus and the
    run summary. Checked when the run starts; empty: none."""
    ijb_target: str = ""
    """IJBB or IJBC when eval.ijb holds both; empty: read from its meta file names."""


@dataclass
class RunSettings:
    name: str = ""
    """Run name (Ray Train run name); empty: derived from backbone, method and a timestamp."""
    storage: str = "~/fr_train_runs"
    num_workers: int = 0
    """Ray Train workers (one per GPU); 0: all GPUs of the cluster, or 2 CPU workers without GPUs."""
    min_workers: int = 0
    """Elastic runs: the fewest workers to train on (0: num_workers, a fixed size). Between min_workers and
    num_workers, Ray Train restarts the workers at whatever size the cluster holds (a node lost: fewer;
    one back: more), each time from the newest checkpoint, and the global batch data.batch_size ×
    num_workers × grad_accum stays the same (fr_train/train/batch_plan.py). Needs data.sampler=global
    or pk (the same images per step at any size) and an explicit num_workers."""
    resize_interval_s: float = 60.0
    """Elastic runs: how often Ray Train looks for room to grow while training
    (ScalingConfig.elastic_resize_monitor_interval_s). A grow restarts from the newest checkpoint."""
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU. bf16 also runs on CPU (slowly:
    the tests run the GPU's configuration so); fp16 needs CUDA. Resolved in fr_train/train/engine.py."""
    channels_last: Literal["auto", "true", "false"] = "auto"
    """Activations in channels_last (NHWC) memory format; auto: on CUDA. Allowed on CPU (tests)."""
    zero_stage: int = 0
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    max_failures: int = 3
    cpus_per_worker: int = 1
    ray_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    """Ray's and DeepSpeed's lines on the console. At WARNING (the default) a run prints fr_train's
    lines only; INFO brings back Ray's driver lines (token notice, "Started a local Ray instance"),
    Ray Train's line per reported result and DeepSpeed's prints while its engine starts."""
    placement_timeout_s: float = 600.0
    """On a cluster fr_train joins (`ray job submit`, RAY_ADDRESS): how long to wait, with a message,
    for room for every worker (an autoscaler adding nodes) before failing. A local cluster cannot
    grow: a request it cannot place is refused at once."""
    export_onnx: bool = True
    """Also write final/backbone.onnx (checked against torch by onnxruntime) at the end of the run."""
    overwrite: bool = False
    """Start a new run in place of the one in run.storage/run.name (the CLI's --overwrite). A run name owns
    its directory: without this, a new run (checkpoint.resume=never, or auto with nothing loadable to
    continue from) refuses a directory that holds checkpoints or final/ instead of silently replacing
    another run's model. With it, the old run's checkpoints/ (set-aside ones included), final/,
    train_log.jsonl and config.json are deleted when the run starts, each listed in the log first: only
    then, because the user asked. Needs checkpoint.resume=never (--overwrite implies it). A restart of
    the same launch by Ray deletes nothing: it continues from that launch's own newest checkpoint
    (fr_train/checkpointing/rundir.py)."""


@dataclass
class MetricsConfig:
    pushgateway: str = ""
    """Pushgateway URL, e.g. http://127.0.0.1:9091 (empty: no push)."""
    port: int = 0
    """Serve /metrics on port+rank (0: no server)."""
    bind: str = "127.0.0.1"
    push_interval: float = 5.0
    below_max_alert_minutes: float = 30.0
    """Elastic runs: the FrTrainBelowMaxSize alert fires after the run trained below run.num_workers for
    this long (exported as fr_train_below_max_size_alert_seconds, read by ops/prometheus/alerts.yml)."""
    tensorboard: bool = True
    """Rank 0 also writes the log's events as TensorBoard curves in STORAGE/RUN/tensorboard/
    (fr_train/train/tensorboard_sink.py); `tensorboard --logdir STORAGE` shows the runs."""


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    every_minutes: float = 30.0
    keep: int = 3
    resume: str = "auto"
    """auto: resume the run of the same name if it has a checkpoint; never; or a checkpoint path."""
    preemption_poll_steps: int = 10
    """Every N steps all ranks ask Ray Train whether a node of the run is being preempted (drained,
    e.g. a spot instance reclaim; a barrier over the workers). On a notice they checkpoint at once
    and train on until Ray restarts them from it. 0: never ask."""
    sigterm_grace_s: float = 120.0
    """A worker sent SIGTERM (a spot VM shutting down, `ray stop`) finishes its step and checkpoints;
    it waits at most this long for that before exiting anyway (clouds give 30 s to 2 min)."""
    pin_host_memory: bool = True
    """A save copies the state into host buffers kept from one save to the next (checkpointing/
    staging.py): they hold one checkpoint of the rank in host memory for the whole run (~20 GiB per
    GPU for a 10M-class bf16 head; on CPU a second copy of the state). Training on a GPU, true
    page-locks the buffers of device tensors (exact size), so the copy (the only time a step waits)
    runs at PCIe speed; false: pageable, slower to fill but swappable — for hosts where many GPUs
    share little memory. No effect on CPU."""


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (seed 002, EKD; fr_train/losses/distill.py)."""

    teacher: str = ""
    """A trained fr_train model: a finished run's directory or its final/ (backbone.safetensors +
    model.json). Empty: no distillation. The teacher sees the same (augmented) images as the student."""
    feature_weight: float = 0.0
    """Weight of mean ‖x̂ − t̂‖² (student and teacher features; needs equal embedding sizes)."""
    ekd_pos_weight: float = 0.0
    """Weight of EKD's rank term on the positive pairs of the global batch (official: 0.02)."""
    ekd_neg_weight: float = 0.0
    """Weight of EKD's rank term on the hardest negative pairs (official: 0.01)."""
    ekd_topk: int = 2000
    ekd_temperature: float = 0.01
    ekd_momentum: float = 0.01
    """Moving-average rate of the FPR thresholds."""


@dataclass
class TrainConfig:
    """Everything that defines a run; `method` names the preset it was built from."""

    method: str = "arcface"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunSettings = field(default_factory=RunSettings)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        cfg = cls()
        apply_mapping(cfg, data)
        from fr_train.config_rules import validate  # the rules need the tree defined here

        validate(cfg)
        return cfg


def build_config(
    backbone: str,
    method: str,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> TrainConfig:
    """Defaults ← method preset ← TOML file ← `--set key=value` overrides, then validation."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    cfg = TrainConfig(method=method)
    cfg.backbone.name = backbone
    for key, value in METHODS[method][1].items():
        set_value(cfg, key, value)
    if config_file is not None:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        apply_mapping(cfg, data, source=str(path))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. head.sample_rate=0.1)")
        set_value(cfg, key.strip(), parse_value(cfg, key.strip(), raw.strip()))
    if cfg.checkpoint.resume not in ("auto", "never", ""):
        # Absolute: the workers run in another directory (Ray's), where a relative path means nothing.
        cfg.checkpoint.resume = str(Path(cfg.checkpoint.resume).expanduser().absolute())
    from fr_train.config_rules import validate  # the rules need the tree defined here

    validate(cfg)
    return cfg


def valid_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every settable dotted key of the tree (for error messages and `fr_train list`)."""
    obj = TrainConfig() if obj is None else obj
    keys: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(valid_keys(value, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _field_type(owner: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(owner))
    return hints[name]


def _resolve(cfg: TrainConfig, key: str) -> tuple[Any, str]:
    parts = key.split(".")
    owner: Any = cfg
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(owner)}
        if part not in names:
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys(cfg))}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(owner, part)):
                raise ConfigError(f"{key!r} is a section; set one of its keys: "
                                  f"{', '.join(valid_keys(getattr(owner, part), key + '.'))}")
            return owner, part
        owner = getattr(owner, part)
        if not dataclasses.is_dataclass(owner):
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys(cfg))}")
    raise ConfigError(f"empty config key {key!r}")


def parse_value(cfg: TrainConfig, key: str, raw: str) -> Any:
    """Parse a command-line string into the type the field declares."""
    owner, name = _resolve(cfg, key)
    return _coerce(_field_type(owner, name), raw, key)


def _split_list(raw: str, key: str) -> list[Any]:
    """A list from the command line: ``a,b``, or bracketed as in TOML (``[1, 2]``, ``["lfw", "agedb"]``,
    ``[lfw, agedb]``). Brackets used to become part of the first and last items (``["[1", "2]"]``)."""
    text = raw.strip()
    if text.startswith("[") != text.endswith("]"):
        raise ConfigError(f"{key}: {raw!r} has an unmatched bracket; write a,b or [a, b]")
    if text.startswith("["):
        try:
            parsed = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            text = text[1:-1]  # unquoted words: [lfw, agedb]
        else:
            return list(parsed)
    items = [v.strip().strip("\"'") for v in text.split(",")]
    if any("[" in v or "]" in v for v in items):
        raise ConfigError(f"{key}: {raw!r} is not a list of values; write a,b or [a, b]")
    return [v for v in items if v]


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        # Only a spelled-out none: an empty string (`--data "$UNSET"`) is a mistake, not a choice.
        is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        (item_tp,) = args
        if isinstance(value, str):
            value = _split_list(value, key)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:  # "12" exactly, whatever its size; "1e3" or "12.0" through float, refused unless exact
            return int(str(value).strip())
        except ValueError:
            pass
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not f.is_integer() or abs(f) >= 2**53:  # beyond 2**53 a float no longer holds every integer
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def set_value(cfg: TrainConfig, key: str, value: Any) -> None:
    owner, name = _resolve(cfg, key)
    setattr(owner, name, _coerce(_field_type(owner, name), value, key))


def apply_mapping(cfg: TrainConfig, data: dict[str, Any], source: str = "config", prefix: str = "") -> None:
    """Apply a nested mapping (TOML or a saved config) onto the tree, key by key."""
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            apply_mapping(cfg, v, source, key + ".")
        else:
            try:
                set_value(cfg, key, v)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
