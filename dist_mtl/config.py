"""One dataclass tree for a run: YAML files, dotted command-line overrides, validation at load.

Every field has a comment that says what it does; `load_config` rejects unknown keys and invalid
values with the field's full dotted path and what would be valid.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_mtl.balancers import BALANCER_NAMES, balancer_needs_gramian, balancer_options, build_balancer
from dist_mtl.balancers.aligned_mtl import SCALE_MODES
from dist_mtl.balancers.cagrad import DEFAULT_C
from dist_mtl.balancers.dwa import DEFAULT_TEMPERATURE
from dist_mtl.balancers.famo import DEFAULT_FAMO_GAMMA, DEFAULT_FAMO_LR
from dist_mtl.balancers.getmtl import DEFAULT_EPS, DEFAULT_MAX_SCALE
from dist_mtl.balancers.mgda import APPLY_MODES, NORMALIZATIONS
from dist_mtl.balancers.solver import DEFAULT_MAX_ITER, DEFAULT_TOL
from dist_mtl.balancers.uw import DEFAULT_UW_LR
from dist_mtl.data import DATASET_NAMES, dataset_num_tasks, dataset_options
from dist_mtl.data.synthetic import build_synthetic
from dist_mtl.errors import ConfigError
from dist_mtl.models import ENCODER_NAMES, NORM_NAMES, NORMED_ENCODERS


def _synthetic_default(option: str) -> Any:
    """The synthetic builder's own default, so the config and the builder cannot disagree."""
    return inspect.signature(build_synthetic).parameters[option].default


@dataclass
class DataConfig:
    # multidigits | synthetic (bundled, in memory) | shards (any directory written by `dist-mtl data
    # celeba` or `dist-mtl data arrays`, streamed) | celeba (the same as shards)
    name: str = "multidigits"
    tasks: str = "pair"  # multidigits: "pair" (left/right digit) or "binary" (derived binary tasks)
    num_tasks: int | None = (
        None  # multidigits binary / synthetic: number of tasks (None = the data set's default)
    )
    train_size: int = 20000  # composed / generated training samples (multidigits, synthetic)
    test_size: int = 4000  # composed / generated test samples
    input_dim: int = 64  # synthetic: input dimension
    path: str = ""  # shards / celeba: the shard directory (with its manifest.json)
    image_size: int = 64  # shards / celeba: encoded images are resized to this square size
    max_samples: int | None = None  # shards / celeba: only the first N samples of each split (None = all)
    test_split: str = "test"  # shards / celeba: the split evaluated ("test", or "val" for CelebA)
    workers: int = 0  # shards / celeba: loader worker processes per rank (0 = read in the training process)
    shuffle_buffer: int = 2000  # shards / celeba: samples in the seeded shuffle buffer (>= 1)
    # shards / celeba: what a corrupt sample does: raise (an error naming shard and key) or skip (the
    # sample is masked as unlabelled on every rank of its group, and counted)
    on_error: str = "raise"
    num_clusters: int = _synthetic_default("num_clusters")  # synthetic: task clusters, in [1, num_tasks]
    # synthetic: paired clusters have centres with cosine -conflict (planted conflicts), in [0, 1]
    conflict: float = _synthetic_default("conflict")
    # synthetic: fraction of (sample, task) labels removed (-1 = no label), in [0, 1)
    missing_labels: float = _synthetic_default("missing_labels")
    batch_size: int = 256  # global batch per task group (every rank of a group sees the same batch)


@dataclass
class ModelConfig:
    encoder: str = "lenet"  # mlp | lenet | resnet18
    hidden: list[int] = field(default_factory=lambda: [256, 256])  # mlp hidden widths
    rep_dim: int = 64  # width of the representation Z (mlp, lenet)
    width: int = 64  # resnet18 base width (64 in the MGDA CelebA recipe)
    # Normalisation layers of resnet18 (mlp and lenet have none): batch (BatchNorm, per-replica
    # statistics), sync (BatchNorm with statistics reduced over the replica group: equals one process
    # on the global batch) or group (GroupNorm, independent of the batch)
    norm: str = "batch"


@dataclass
class BalancerConfig:
    # Gramian balancers: uniform | mgda | getmtl | mamg | upgrad | dualproj | pcgrad | cagrad | imtl_g |
    # aligned_mtl | fairgrad | nash_mtl; loss balancers (no Gramian, one backward of sum_t c_t L_t per
    # step): famo | uw | dwa | rlw
    name: str = "mgda"
    normalization: str = "none"  # mgda / getmtl: gradient normalisation none | l2 | loss | loss+
    apply: str = "adopted"  # mgda: "adopted" (c = a / n) or "official" (c = a, as the official code)
    eps: float = DEFAULT_EPS  # getmtl: trade-off radius in (0, 1]
    max_scale: float = DEFAULT_MAX_SCALE  # getmtl: cap (> 1) on the factor 1 / (1 - eps ||g0||)
    # mamg / pcgrad: seed of the per-step random task orders; rlw: of the random weights; task_sample:
    # of the random subsets
    seed: int = 0
    # The solver's relative tolerance and iteration cap (mgda / getmtl / cagrad: min-norm and simplex
    # QPs; upgrad / dualproj: dual-cone projections). fairgrad / nash_mtl keep their Newton solver's
    # own defaults (1e-12, 100 iterations) unless these are set away from the values here
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER
    # upgrad / dualproj: TorchJD's regularisation of the dual-cone QPs (0 = the exact projection; TorchJD
    # uses 1e-4 for both): normalise M by its trace when above norm_eps, add reg_eps * I
    norm_eps: float = 0.0
    reg_eps: float = 0.0
    c: float = DEFAULT_C  # cagrad: radius (>= 0) of the ball around the mean gradient; 0 = the mean
    scale_mode: str = "min"  # aligned_mtl: eigenvalue that scales the aligned gradients: min | median | rmse
    alpha: float = 1.0  # fairgrad: alpha-fairness (> 0); 1 = proportional fairness (Nash-MTL's equation)
    famo_lr: float = DEFAULT_FAMO_LR  # famo: step size (> 0) of the task logits' update
    famo_gamma: float = DEFAULT_FAMO_GAMMA  # famo: decay (>= 0) of the task logits
    uw_lr: float = DEFAULT_UW_LR  # uw: Adam learning rate (> 0) of the log-variances s_t
    temperature: float = DEFAULT_TEMPERATURE  # dwa: softmax temperature (> 0)
    # Any balancer: solve every N steps (>= 1); the steps between reuse the last coefficients and take
    # one backward of sum_t c_t L_t with no Gramian exchange and no solve
    update_every: int = 1
    # Gramian balancers: balance a seeded random subset of S tasks each step (S x S sub-Gramian), the
    # other tasks weighted by the sampled ones' mean coefficient; 0 = off, else 1 <= S <= T. Saves
    # solve time at large T, not backward passes
    task_sample: int = 0


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 2e-3  # learning rate (> 0)
    momentum: float = 0.9  # sgd momentum
    weight_decay: float = 0.0  # L2 weight decay (>= 0)
    lr_decay: float = 1.0  # multiply the learning rate by this every decay_every epochs, in (0, 1]
    decay_every: int = 0  # epochs between learning-rate decays (0 = constant learning rate)


@dataclass
class EvalConfig:
    # single-task results (a summary.json, or JSON {task: error}) to report Delta-m% against ("" = none)
    baseline: str = ""
    batch_size: int = 1024  # evaluation batch per rank


@dataclass
class TrainConfig:
    mode: str = "exact"  # exact: T backward passes into the encoder; rep: MGDA-UB on representation gradients
    epochs: int = 3  # passes over the training set (ignored when steps > 0)
    steps: int = 0  # total optimizer steps (0 = derive from epochs)
    eval_every: int = 0  # evaluate every N steps (0 = once per epoch and at the end)
    log_every: int = 10  # write scalars every N steps
    checkpoint_every: int = 0  # write a checkpoint every N steps (0 = only at the end)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads per process (0 = leave torch's default)
    progress: bool = True  # show a progress bar (rank 0 only)
    # rep mode, one process: every N steps check in parameter space that d decreases every task
    # (costs T extra encoder backward passes on those steps; 0 = never)
    descent_check_every: int = 0
    # Stop with exit 1 when more than this fraction of the steps so far were skipped (non-finite
    # Gramian or losses): a run that learned nothing must not end with exit 0
    max_skipped_fraction: float = 0.5


@dataclass
class EngineConfig:
    # auto | gather | gramian | sketch | rep (used when world size > 1). auto resolves at load to rep
    # when train.mode is rep, else gramian; the resolved name is what config.yaml records
    protocol: str = "auto"
    replicas: int = 0  # D: data-parallel replicas (0 = world_size // task_parallel)
    task_parallel: int = 0  # K: ranks per task group (0 = world_size // replicas, or world size)
    split: list[int] = field(default_factory=list)  # tasks per rank of a task group (empty = balanced)
    compression: str = "none"  # gather: none | fp16 | bf16 | topk | countsketch
    topk_ratio: float = 0.01  # gather topk: fraction of coordinates kept, in (0, 1]
    sketch_size: int = 4096  # sketch / countsketch: sketch width m (>= 1)
    sketch_seed: int = 0  # seed of the shared count-sketch hashes
    timeout_s: float = 120.0  # collective timeout; a dead rank fails the job within about this bound
    checksum_every: int = 50  # compare replicated parameters across ranks every N steps (0 = never)
    # start each owned task's exchange as soon as its backward ends, so it runs under the next task's
    # backward (exact protocols); in rep, all-reduce the encoder gradient in buckets during its backward
    overlap: bool = True
    # gramian with overlap: each task's all-to-all goes in this many rounds along the shards, each sent
    # while the task's own backward still runs, as soon as the parameters it covers have gradients
    overlap_chunks: int = 4
    bucket_mb: float = 25.0  # rep with overlap: size of one gradient all-reduce bucket, in MiB
    # gramian: step the optimizer on this rank's shard of d only (1/K of the optimizer state, 1/W with
    # D > 1) and all-gather the updated parameters instead of d (ZeRO-1). Ignored by other protocols.
    shard_optimizer: bool = True
    # gramian: element type of the task-gradient all-to-all (float32 | bfloat16). bfloat16 halves those
    # bytes; the Gramian is formed from the bf16 shards and d from exact local gradients.
    wire_dtype: str = "float32"
    # torch | deepspeed: who owns the shared encoder's optimizer step (dist_mtl.deepspeed). deepspeed
    # needs the extra (pip install -e '.[deepspeed]'); its ZeRO replaces engine.shard_optimizer
    backend: str = "torch"
    deepspeed_config: str = ""  # deepspeed: a DeepSpeed JSON passed through; the fields below override it
    zero_stage: int = 0  # deepspeed: ZeRO stage 0-3 (1: optimizer state, 2: + gradients, 3: + parameters)
    bf16: bool = False  # deepspeed: bfloat16 encoder parameters and gradients, float32 master and state
    offload_optimizer: bool = False  # deepspeed: optimizer state and step on the CPU (ZeRO >= 1)


@dataclass
class ObserveConfig:
    tensorboard: bool = True  # write TensorBoard event files under RUN_DIR/tb
    jsonl: bool = True  # write RUN_DIR/metrics/rank{N}.jsonl
    profiler_start: int = 0  # first step of a torch.profiler window
    profiler_steps: int = 0  # length of the torch.profiler window (0 = off)
    sync_cuda: bool = False  # synchronize CUDA at phase boundaries for exact per-phase GPU times
    # at the end of training, put the `dist-mtl report` figures (per-task error, task weights, step
    # time per phase and rank, gradient cosines) into TensorBoard as images (rank 0, with tensorboard)
    figures: bool = True


@dataclass
class RunConfig:
    run_dir: str = "runs/multidigits_mgda"  # where checkpoints, logs and summary.json go
    seed: int = 0  # seeds data order, initialisation and balancer randomness
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)


# Exchange protocols of dist_mtl.engine. config cannot import the engine (the engine imports config),
# so the names are listed here and tests/unit/test_config.py checks them against the engine's.
PROTOCOL_NAMES: tuple[str, ...] = ("gather", "gramian", "sketch", "rep")
# The model fields each encoder reads (dist_mtl.models.build_model has no per-encoder registry);
# model.norm only for the encoders with normalisation layers (dist_mtl.models.NORMED_ENCODERS).
_ENCODER_FIELDS = {"mlp": ("hidden", "rep_dim"), "lenet": ("rep_dim",), "resnet18": ("width",)}
ENCODER_OPTIONS: dict[str, tuple[str, ...]] = {
    name: _ENCODER_FIELDS[name] + (("norm",) if name in NORMED_ENCODERS else ()) for name in ENCODER_NAMES
}
# The optim fields each optimizer reads.
OPTIMIZER_OPTIONS: dict[str, tuple[str, ...]] = {
    "adam": ("lr", "weight_decay", "lr_decay", "decay_every"),
    "sgd": ("lr", "momentum", "weight_decay", "lr_decay", "decay_every"),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": DATASET_NAMES,
    "data.tasks": ("pair", "binary"),
    "data.on_error": ("raise", "skip"),
    "model.encoder": ENCODER_NAMES,
    "model.norm": NORM_NAMES,
    "balancer.name": BALANCER_NAMES,
    "balancer.normalization": NORMALIZATIONS,
    "balancer.apply": APPLY_MODES,
    "balancer.scale_mode": SCALE_MODES,
    "optim.name": tuple(OPTIMIZER_OPTIONS),
    "train.mode": ("exact", "rep"),
    "train.device": ("auto", "cpu", "cuda"),
    "engine.protocol": ("auto", *PROTOCOL_NAMES),
    "engine.compression": ("none", "fp16", "bf16", "topk", "countsketch"),
    "engine.wire_dtype": ("float32", "bfloat16"),
    "engine.backend": ("torch", "deepspeed"),
}

_POSITIVE = (
    "data.batch_size",
    "data.train_size",
    "data.test_size",
    "data.num_clusters",
    "optim.lr",
    "balancer.tol",
    "balancer.max_iter",
    "train.log_every",
    "engine.timeout_s",
    "engine.sketch_size",
    "engine.bucket_mb",
    "engine.overlap_chunks",
    "data.image_size",
    "data.input_dim",
    "model.rep_dim",
    "model.width",
    "data.shuffle_buffer",
    "eval.batch_size",
)
_NON_NEGATIVE = (
    "optim.momentum",
    "optim.weight_decay",
    "train.epochs",
    "train.steps",
    "train.eval_every",
    "train.checkpoint_every",
    "train.threads",
    "train.descent_check_every",
    "engine.replicas",
    "engine.task_parallel",
    "data.workers",
    "optim.decay_every",
    "engine.checksum_every",
    "observe.profiler_start",
    "observe.profiler_steps",
    "seed",
)


def _get(cfg: RunConfig, path: str) -> Any:
    obj: Any = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _float_fields(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every float field of the tree, so none can be forgotten."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value, f"{prefix}{f.name}.")
        elif float in (hints[f.name], *typing.get_args(hints[f.name])):
            yield f"{prefix}{f.name}", value


def _check_finite(cfg: RunConfig) -> None:
    """inf and nan parse as floats and pass `> 0` tests (inf) or every test (nan); reject both."""
    for path, value in _float_fields(cfg):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{path} must be a finite number; got {value!r}")


def _check_ranges(cfg: RunConfig) -> None:
    """Every value with a limited domain on its own: choices, signs, intervals."""
    for path, choices in _CHOICES.items():
        value = _get(cfg, path)
        if value not in choices:
            raise ConfigError(f"{path} must be one of {', '.join(choices)}; got {value!r}")
    for path in _POSITIVE:
        if not _get(cfg, path) > 0:
            raise ConfigError(f"{path} must be > 0; got {_get(cfg, path)!r}")
    for path in _NON_NEGATIVE:
        if _get(cfg, path) < 0:
            raise ConfigError(f"{path} must be >= 0; got {_get(cfg, path)!r}")
    if cfg.data.num_tasks is not None and cfg.data.num_tasks < 1:
        raise ConfigError(
            f"data.num_tasks must be >= 1 (an empty task list cannot be trained); got {cfg.data.num_tasks}"
        )
    if cfg.data.max_samples is not None and cfg.data.max_samples < 1:
        raise ConfigError(f"data.max_samples must be >= 1 or null (all samples); got {cfg.data.max_samples}")
    if not 0.0 <= cfg.data.conflict <= 1.0:
        raise ConfigError(f"data.conflict must be in [0, 1] (a cosine magnitude); got {cfg.data.conflict!r}")
    if not 0.0 < cfg.balancer.eps <= 1.0:
        raise ConfigError(f"balancer.eps must be in (0, 1]; got {cfg.balancer.eps!r}")
    if not cfg.balancer.max_scale > 1.0:
        raise ConfigError(f"balancer.max_scale must be > 1; got {cfg.balancer.max_scale!r}")
    for path in ("balancer.famo_lr", "balancer.uw_lr", "balancer.temperature"):
        if not _get(cfg, path) > 0:
            raise ConfigError(f"{path} must be > 0; got {_get(cfg, path)!r}")
    if cfg.balancer.famo_gamma < 0:
        raise ConfigError(f"balancer.famo_gamma must be >= 0; got {cfg.balancer.famo_gamma!r}")
    if cfg.balancer.update_every < 1:
        raise ConfigError(
            f"balancer.update_every must be >= 1 (1 = solve every step); got {cfg.balancer.update_every!r}"
        )
    if cfg.balancer.task_sample < 0:
        raise ConfigError(
            f"balancer.task_sample must be 0 (off) or in [1, T]; got {cfg.balancer.task_sample!r}"
        )
    if not 0.0 <= cfg.train.max_skipped_fraction <= 1.0:
        raise ConfigError(
            f"train.max_skipped_fraction must be in [0, 1]; got {cfg.train.max_skipped_fraction!r}"
        )
    if not 0.0 < cfg.optim.lr_decay <= 1.0:
        raise ConfigError(f"optim.lr_decay must be in (0, 1]; got {cfg.optim.lr_decay!r}")
    if not 0.0 < cfg.engine.topk_ratio <= 1.0:
        raise ConfigError(f"engine.topk_ratio must be in (0, 1]; got {cfg.engine.topk_ratio!r}")
    if any(w <= 0 for w in cfg.model.hidden):
        raise ConfigError(f"model.hidden widths must be > 0; got {cfg.model.hidden!r}")
    if any(n <= 0 for n in cfg.engine.split):
        raise ConfigError(f"engine.split entries must be >= 1 task per rank; got {cfg.engine.split!r}")


def _check_relations(cfg: RunConfig) -> None:
    """Checks that relate several fields, or a field and the file system."""
    if cfg.data.name in ("shards", "celeba") and not cfg.data.path:
        raise ConfigError(
            f"data.path must name a shard directory (with manifest.json) when data.name is {cfg.data.name!r}"
        )
    if cfg.data.path and not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path: no such file or directory: {cfg.data.path}")
    if (cfg.optim.lr_decay != 1.0) != (cfg.optim.decay_every > 0):
        raise ConfigError(
            f"optim.lr_decay {cfg.optim.lr_decay:g} and optim.decay_every {cfg.optim.decay_every} must be "
            "set together (a decay below 1 every N > 0 epochs), or left at 1 and 0 for a constant rate"
        )
    _check_deepspeed(cfg)
    _check_shard_optimizer(cfg)
    if cfg.eval.baseline and not Path(cfg.eval.baseline).is_file():
        raise ConfigError(f"eval.baseline: no such file: {cfg.eval.baseline}")
    if cfg.train.epochs == 0 and cfg.train.steps == 0:
        raise ConfigError("train.epochs and train.steps are both 0: set one of them to a positive number")
    if not cfg.run_dir:
        raise ConfigError("run_dir must not be empty")
    check_batch_fits(cfg, known_train_size(cfg))
    _check_task_sample(cfg)
    try:  # each balancer checks its own options' ranges, naming the field (balancer.c must be >= 0 ...)
        build_balancer(cfg.balancer.name, **balancer_kwargs(cfg.balancer))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


# Optimizers whose update of a coordinate reads only that coordinate's gradient and state, so that a
# rank can step its shard of the parameters alone (engine.shard_optimizer). Adam and SGD (momentum,
# L2 weight decay) are; one that reads a global norm (LAMB, clipping) would not be.
ELEMENTWISE_OPTIMIZERS: frozenset[str] = frozenset({"adam", "sgd"})


def _check_shard_optimizer(cfg: RunConfig) -> None:
    e = cfg.engine
    applies = e.shard_optimizer and e.protocol in ("auto", "gramian") and cfg.train.mode != "rep"
    if applies and cfg.optim.name not in ELEMENTWISE_OPTIMIZERS:
        raise ConfigError(
            f"engine.shard_optimizer steps each rank's shard of the parameters alone, which needs an "
            f"elementwise optimizer ({', '.join(sorted(ELEMENTWISE_OPTIMIZERS))}); optim.name "
            f"{cfg.optim.name!r} is not: set engine.shard_optimizer=false"
        )


_DEEPSPEED_FIELDS = ("deepspeed_config", "zero_stage", "bf16", "offload_optimizer")


def _check_deepspeed(cfg: RunConfig) -> None:
    """engine.backend and its fields, before any process starts: the DeepSpeed fields only with the
    deepspeed backend, which needs the package (found, not imported), a ZeRO stage in 0-3, offload
    with ZeRO >= 1, a readable JSON without the keys the engine cannot honour, and bf16 only where the
    device computes it. With deepspeed, ZeRO does the sharding: engine.shard_optimizer is resolved off."""
    e, defaults = cfg.engine, EngineConfig()
    if e.backend != "deepspeed":
        for name in _DEEPSPEED_FIELDS:
            if getattr(e, name) != getattr(defaults, name):
                raise ConfigError(
                    f"engine.{name} {getattr(e, name)!r} applies only with engine.backend deepspeed; "
                    f"engine.backend is {e.backend!r}"
                )
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "engine.backend deepspeed needs the DeepSpeed package, which is not installed: "
            "pip install -e '.[deepspeed]' (or set engine.backend=torch)"
        )
    if e.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage must be 0, 1, 2 or 3; got {e.zero_stage!r}")
    if e.offload_optimizer and e.zero_stage == 0:
        raise ConfigError("engine.offload_optimizer needs engine.zero_stage >= 1 (ZeRO-Offload); got 0")
    if e.bf16 and e.zero_stage == 0:  # DeepSpeed's stage-0 bf16 wrapper keeps one flat master per group,
        # which neither the single-process checkpoint nor DeepSpeed's safe_* accessors read per parameter
        raise ConfigError(
            "engine.bf16 needs engine.zero_stage >= 1 with engine.backend deepspeed (stage 0 has no "
            "per-parameter bf16 master state for the checkpoint); got engine.zero_stage 0"
        )
    if e.deepspeed_config and not Path(e.deepspeed_config).is_file():
        raise ConfigError(f"engine.deepspeed_config: no such file: {e.deepspeed_config}")
    from dist_mtl.deepspeed_settings import check_bf16, deepspeed_settings  # imports no DeepSpeed

    deepspeed_settings(e, 1)  # the JSON read, and the keys the engine cannot honour refused
    if e.bf16:
        check_bf16(cfg.train.device)
    e.shard_optimizer = False  # DeepSpeed's ZeRO shards the optimizer state instead


def balancer_kwargs(b: BalancerConfig) -> dict[str, Any]:
    """The options the balancer `b.name` takes, as configured. A field left at its config default is
    not passed, so the balancer keeps its own default (fairgrad's Newton tolerance is not the min-norm
    solver's); for every other balancer the two defaults are the same."""
    defaults = BalancerConfig()
    return {
        k: getattr(b, k)
        for k in balancer_options(b.name)
        if hasattr(b, k) and getattr(b, k) != getattr(defaults, k)
    }


def _check_task_sample(cfg: RunConfig) -> None:
    """task_sample wraps a Gramian balancer and needs 1 <= S <= T; T comes from the data config (a
    shard directory's manifest is read, nothing is built), so the error comes before any process."""
    b = cfg.balancer
    if not b.task_sample:
        return
    if not balancer_needs_gramian(b.name):
        raise ConfigError(
            f"balancer.task_sample applies to Gramian balancers; {b.name!r} weighs the losses alone (one "
            "backward pass a step already): set balancer.task_sample=0"
        )
    d = cfg.data
    t = dataset_num_tasks(d.name, tasks=d.tasks, num_tasks=d.num_tasks, path=d.path)
    if b.task_sample > t:
        raise ConfigError(
            f"balancer.task_sample S={b.task_sample} exceeds the number of tasks T={t} of data.name "
            f"{d.name!r}; use 0 (off) or 1 <= S <= {t}"
        )


def known_train_size(cfg: RunConfig) -> int | None:
    """The training split's size when the config alone fixes it (a builder that takes train_size)."""
    return cfg.data.train_size if "train_size" in dataset_options(cfg.data.name) else None


def check_batch_fits(cfg: RunConfig, train_size: int | None, *, source: str = "data.train_size") -> None:
    """A global batch larger than the training split would give zero steps per epoch; name both."""
    if train_size is not None and cfg.data.batch_size > train_size:
        raise ConfigError(
            f"data.batch_size {cfg.data.batch_size} is larger than the training split of "
            f"{cfg.data.name!r} ({train_size} samples, {source}); use data.batch_size <= {train_size}"
        )


def resolve_protocol(cfg: RunConfig) -> None:
    """engine.protocol auto: rep for train.mode rep (the only protocol that implements it), else gramian."""
    if cfg.engine.protocol == "auto":
        cfg.engine.protocol = "rep" if cfg.train.mode == "rep" else "gramian"


# Fields every component of a section reads, so never "unused" (balancer: the levers, which wrap any
# balancer; task_sample's own limits are checked in _check_task_sample).
_ALWAYS_USED: dict[str, tuple[str, ...]] = {
    "data": ("name", "batch_size"),
    "model": ("encoder",),
    "balancer": ("name", "update_every", "task_sample"),
    "optim": ("name",),
}


def _section_fields(section: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(getattr(RunConfig(), section)))


def _user_of(cfg: RunConfig, section: str) -> tuple[str, str, tuple[str, ...]]:
    """(kind, name of the component that reads `section`, the section's fields it reads).

    What a component reads comes from its registry (balancer fields, data-set builder signature),
    or from the tables above for encoders and optimizers.
    """
    kind, takes = {
        "data": ("data set", dataset_options),
        "model": ("encoder", ENCODER_OPTIONS.__getitem__),
        "balancer": ("balancer", balancer_options),
        "optim": ("optimizer", OPTIMIZER_OPTIONS.__getitem__),
    }[section]
    component = _get(cfg, f"{section}.{_ALWAYS_USED[section][0]}")
    fields = _section_fields(section)
    read = tuple(f for f in takes(component) if f in fields and f not in _ALWAYS_USED[section])
    if section == "balancer" and cfg.balancer.task_sample and "seed" not in read:
        read += ("seed",)  # the task_sample lever draws its subsets from balancer.seed
    return kind, component, read


def _engine_needs(cfg: RunConfig) -> dict[str, tuple[bool, str]]:
    """Engine fields that only some protocols read: (read here?, when they are read)."""
    e = cfg.engine
    gather = e.protocol == "gather"
    sketch = e.protocol == "sketch" or (gather and e.compression == "countsketch")
    sketch_when = "engine.protocol sketch, or engine.protocol gather with engine.compression countsketch"
    return {
        "compression": (gather, "engine.protocol gather"),
        "topk_ratio": (
            gather and e.compression == "topk",
            "engine.protocol gather and engine.compression topk",
        ),
        "sketch_size": (sketch, sketch_when),
        "sketch_seed": (sketch, sketch_when),
        "wire_dtype": (e.protocol == "gramian", "engine.protocol gramian"),
        "overlap_chunks": (
            e.protocol == "gramian" and e.overlap,
            "engine.protocol gramian and engine.overlap true",
        ),
        "bucket_mb": (e.protocol == "rep" and e.overlap, "engine.protocol rep and engine.overlap true"),
    }


def _check_used(cfg: RunConfig) -> None:
    """A field set away from its default that the chosen component does not read is an error.

    Such a field would silently do nothing (e.g. balancer.normalization with getmtl), so the run
    would not be the one the user asked for.
    """
    defaults = RunConfig()
    for section in _ALWAYS_USED:
        kind, component, takes = _user_of(cfg, section)
        for name in _section_fields(section):
            path = f"{section}.{name}"
            if name in takes or name in _ALWAYS_USED[section] or _get(cfg, path) == _get(defaults, path):
                continue
            raise ConfigError(
                f"{path} is not used by {kind} {component!r} (it takes: {', '.join(takes) or 'no options'}); "
                f"remove it or pick another {kind}"
            )
    e = cfg.engine
    user = f"engine.protocol {e.protocol!r}" + (
        f" with engine.compression {e.compression!r}" if e.protocol == "gather" else ""
    )
    for name, (used, when) in _engine_needs(cfg).items():
        path = f"engine.{name}"
        if not used and _get(cfg, path) != _get(defaults, path):
            raise ConfigError(
                f"{path} {_get(cfg, path)!r} applies only with {when}; it is not used by {user}"
            )


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value, resolve engine.protocol auto, then reject fields the run would not use.

    Raises ConfigError naming the field and what is valid. Returns `cfg` (resolved in place).
    """
    _check_finite(cfg)
    _check_ranges(cfg)
    _check_relations(cfg)
    resolve_protocol(cfg)
    _check_used(cfg)
    return cfg


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML / command-line value to the field's type, or raise naming the field."""
    origin = typing.get_origin(annotation)
    if origin in (list, Sequence):
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            value = [] if value in ([""], None) else value
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list of {item_type.__name__}; got {value!r}")
        return [_coerce(f"{path}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(path, value, args[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path} must be true or false; got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path} must be an integer; got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path} must be an integer; got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path} must be a number; got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path} must be a number; got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path} must be a string; got {value!r}")
        return str(value)
    raise ConfigError(f"{path}: unsupported annotation {annotation}")


def _merge(obj: Any, values: Mapping[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{path} must be a mapping of {', '.join(f.name for f in dataclasses.fields(current))}"
                )
            _merge(current, value, f"{path}.")
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into a nested mapping; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=0.01)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return nested


def split_config_and_overrides(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the YAML file; everything else is a dotted override."""
    config, overrides = None, []
    for arg in args:
        if "=" not in arg and config is None and not overrides:
            config = arg
        elif "=" not in arg:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like section.key=value")
        else:
            overrides.append(arg)
    return config, overrides


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults, then the YAML file (if any), then dotted overrides; validated."""
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _merge(cfg, loaded, "")
    _merge(cfg, parse_overrides(overrides), "")
    return validate(cfg)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
