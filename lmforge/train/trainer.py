"""One training loop for every task: the task brings a model, a loss, a batch source and an eval function.

The loop knows nothing about tasks. It does gradient accumulation weighted by item counts, clipping,
warmup + decay schedules, bf16 autocast (precision auto | fp32 | bf16: lmforge.train.precision), periodic eval
with best-model keeping and early stopping, atomic checkpoints that resume bit-exactly (weights, optimizer,
scheduler, every RNG, data position), a time budget, metrics.jsonl and a PNG of the curves. What differs
between one process, DDP and FSDP is its Strategy's business (lmforge.train.strategy): the loop never asks
which one it has. Rank 0 alone writes files and shows progress; a write that fails for an OS reason (full
disk, read-only filesystem) stops every rank with one line that names what was kept and how to continue.

Run directory layout (config.output_dir):
  trainer_config.json   the config of the (last) session, with the precision it resolved to and the host
                        it ran on (CPU model, family/model numbers, SIMD flags, threads; or the GPU)
  metrics.jsonl         one JSON record per log step, eval and end of session
  curves.png            train loss, lr and eval metrics against the step
  checkpoints/step-N/   resumable state (last `keep_checkpoints` kept), `checkpoints/latest` pointer
  best/                 exported model of the best eval (`keep_best`), via save_model_fn
  final/                exported model at the end of training, via save_model_fn
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.cpu_kernels import cpu_identity
from lmforge.device import resolve_device as _resolve_device
from lmforge.errors import TrainingError
from lmforge.io import atomic_dir, atomic_write, clean_partial, release_free_memory
from lmforge.train.batching import DatasetBatches
from lmforge.train.checkpoint import (
    CHECKPOINTS,
    MODEL_FILE,
    latest_checkpoint,
    list_checkpoints,
    one_line,
    read_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
    storable,
)
from lmforge.train.plots import EVAL_PREFIX, eval_key, plot_metrics, read_metrics
from lmforge.train.precision import PRECISIONS, Precision, resolve_precision
from lmforge.train.strategy import Strategy, choose_strategy

SCHEDULES = ("linear", "cosine", "constant")
STOP_REASONS = ("completed", "early_stopping", "max_time")
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
# trainer-config fields that may change between a run and its resumption without a warning
_RESUME_FREE_FIELDS = {"output_dir", "progress", "plot", "max_time_s", "device", "log_every", "overwrite",
                       "compile", "epochs", "max_steps", "eval_every", "save_every", "keep_checkpoints",
                       "early_stopping_patience"}

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, "int | float | torch.Tensor"]]
EvalFn = Callable[[nn.Module], Mapping[str, float]]
SaveModelFn = Callable[[nn.Module, Path, Mapping[str, Any]], None]  # (model, out_dir, full state dict)


@dataclass
class TrainConfig:
    """Everything the loop needs; saved in every checkpoint and in RUN_DIR/trainer_config.json."""

    output_dir: str | Path = "runs/train"
    epochs: float = 1.0  # fractions allowed; ignored when max_steps is set
    max_steps: int | None = None  # optimizer steps
    batch_size: int = 16  # micro-batch per device; one step = batch_size * grad_accum * world_size examples
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01  # decoupled (AdamW); never on norms, biases, embeddings
    layer_lr_decay: float = 1.0  # < 1: block i of n gets lr * this**(n - i), the embeddings lr * this**(n + 1)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    warmup: float = 0.0  # < 1: fraction of the total steps; >= 1: a number of steps
    min_lr_ratio: float = 0.0  # floor of linear/cosine decay, as a fraction of lr
    max_grad_norm: float | None = 1.0  # None or 0: no clipping (the norm is still logged)
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 0  # steps; 0 = a checkpoint only at the end (or when stopping)
    keep_checkpoints: int = 2
    keep_best: str | None = None  # eval metric name (as eval_fn returns it) whose best model goes to best/
    best_mode: str | None = None  # max | min; None: min when the name contains loss/perplexity/ppl, else max
    early_stopping_patience: int | None = None  # evals without improvement of keep_best; None = off
    seed: int = 42
    # auto: bf16 autocast where the device multiplies bf16 natively (CUDA with bf16, CPUs with avx512_bf16/AMX),
    # else fp32; weights and optimizer stay float32. None: bf16 if `bf16` else fp32 (the Python default, the same
    # numbers on every machine; the CLI defaults to auto). A run records what it resolved to, and resumes in it.
    precision: Literal["auto", "fp32", "bf16"] | None = None
    bf16: bool = False  # the older switch: True means precision bf16
    compile: bool = False  # torch.compile the model used for the training forward
    log_every: int = 10
    device: str = "auto"  # auto = cuda if available else cpu
    max_time_s: float | None = None  # budget for this session: stop cleanly, evaluate, save and say so
    bucket_size_multiplier: int = 50  # for plain datasets: sort by length within chunks of batch_size * this
    progress: bool = True  # tqdm bar (rank 0 only)
    plot: bool = True  # curves.png at each eval and at the end
    overwrite: bool = False  # allow a fresh run in a dir that already holds checkpoints (they are deleted)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> TrainingError:
            return TrainingError(f"train config field {name!r}: {why}")

        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        if self.precision is None:
            self.precision = "bf16" if self.bf16 else "fp32"
        elif self.precision not in PRECISIONS:
            raise bad("precision", f"unsupported {self.precision!r} (expected one of {', '.join(PRECISIONS)})")
        elif self.bf16 and self.precision == "fp32":
            raise bad("bf16", "True conflicts with precision 'fp32' (bf16=True means precision 'bf16')")
        elif self.bf16:
            self.precision = "bf16"
        self.bf16 = self.precision == "bf16"  # auto: False until a Trainer resolves it on its device
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"unsupported {self.schedule!r} (expected one of {', '.join(SCHEDULES)})")
        if self.max_steps is None and not self.epochs > 0:
            raise bad("epochs", f"must be > 0 when max_steps is not set, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("max_steps", f"must be >= 1, got {self.max_steps}")
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints", "bucket_size_multiplier"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise bad("layer_lr_decay", f"must be in (0, 1], got {self.layer_lr_decay}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0:
            raise bad("lr/weight_decay/warmup", "lr must be > 0, weight_decay and warmup >= 0")
        if self.best_mode not in (None, "max", "min"):
            raise bad("best_mode", f"must be 'max' or 'min', got {self.best_mode!r}")
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                raise bad("early_stopping_patience", f"must be >= 1, got {self.early_stopping_patience}")
            if not self.keep_best:
                raise bad("early_stopping_patience", "needs keep_best, the eval metric to watch")
        if self.max_time_s is not None and self.max_time_s <= 0:
            raise bad("max_time_s", f"must be > 0, got {self.max_time_s}")

    @property
    def mode(self) -> str:
        """max or min: how keep_best improves."""
        if self.best_mode:
            return self.best_mode
        name = (self.keep_best or "").lower()
        return "min" if any(s in name for s in ("loss", "perplexity", "ppl")) else "max"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output_dir"] = str(self.output_dir)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise TrainingError(f"train config: unknown field(s) {sorted(unknown)}")
        return cls(**d)


@runtime_checkable
class BatchSource(Protocol):
    """What the Trainer iterates: the batches of an epoch from a batch index, the same for the same
    (epoch, start).

    `len()` is the number of batches per epoch on this rank. `DatasetBatches` is the stock implementation.
    """

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[Any]: ...


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    epoch: float
    stopped: str  # completed | early_stopping | max_time
    train_loss: float | None  # last logged training loss
    eval_metrics: dict[str, float]  # last eval (names as eval_fn returns them)
    best_metric: float | None
    best_step: int | None
    elapsed_s: float  # training time over all sessions of the run
    precision: str = "fp32"  # what the run computed in: fp32 | bf16


@dataclass
class _State:
    """Everything about the loop's position that a checkpoint must carry to resume exactly."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # next batch of `epoch` (always at an accumulation-window boundary)
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    last_eval_step: int | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    last_train_loss: float | None = None
    stopped: str | None = None
    elapsed: float = 0.0
    # log accumulators since the last log line
    acc_loss: float = 0.0
    acc_items: float = 0.0
    acc_samples: float = 0.0
    acc_tokens: float = 0.0
    acc_grad_norm: float = 0.0
    acc_steps: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> _State:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---- helpers --------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device): call before building a model to train."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """The training device (see lmforge.device.resolve_device), named as the train config's field."""
    return _resolve_device(name, "train config field 'device'")


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or \
        "norm" in type(m).__name__.lower()


def layer_depths(model: nn.Module) -> tuple[dict[int, int], int] | None:
    """Depth of each parameter of the first Transformer (a module with `embed` and `blocks`) in `model`:
    0 for the embeddings, i + 1 for block i, n_layers + 1 for everything else (final norm, pooler, heads).
    None when the model has no such layout."""
    for m in model.modules():
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and isinstance(getattr(m, "embed", None), nn.Module):
            depth = {id(p): 0 for p in m.embed.parameters()}
            for i, block in enumerate(blocks):
                depth.update({id(p): i + 1 for p in block.parameters()})
            return depth, len(blocks)
    return None


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: "decay" (matrices of linear/attention layers) and "no_decay" (norm weights,
    embeddings, biases and every other 1-D parameter). Decaying a norm gain or an embedding pulls it
    towards zero for no benefit; frozen parameters are left out.

    layer_decay < 1 (layer-wise lr decay): each group is also split by depth (layer_depths), and a
    parameter d levels below the top gets lr * layer_decay**d through the group's "lr_scale", so the
    pretrained lower layers move less than the new head. The top groups come first: the logged lr is theirs."""
    if not 0.0 < layer_decay <= 1.0:
        raise TrainingError(f"train config field 'layer_lr_decay': must be in (0, 1], got {layer_decay}")
    depths, top = ({}, 0)
    if layer_decay < 1.0:
        found = layer_depths(model)
        if found is None:
            raise TrainingError("train config field 'layer_lr_decay': the model has no embeddings + blocks "
                                "(Transformer) to count layers in")
        depths, n_layers = found
        top = n_layers + 1
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()  # an embedding tied to an output projection is seen first where it is defined: undecayed
    for module in model.modules():
        excluded = _is_norm(module) or isinstance(module, nn.Embedding)
        for p in module.parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            groups.setdefault((depths.get(id(p), top), excluded or p.ndim < 2), []).append(p)
    out = []
    for (depth, no_decay), params in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        g = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
             "name": ("no_decay" if no_decay else "decay") + (f".{depth}" if layer_decay < 1.0 else "")}
        if layer_decay < 1.0:
            g["lr_scale"] = layer_decay ** (top - depth)
        out.append(g)
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over param_groups(): fused kernel when the device supports it, else foreach."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_lr_decay)
    if not groups:
        raise TrainingError("model: no trainable parameters (all have requires_grad=False)")
    for g in groups:
        if "lr_scale" in g:
            g["lr"] = cfg.lr * g["lr_scale"]
    kw = {"lr": cfg.lr, "betas": cfg.adam_betas, "eps": cfg.adam_eps}
    for extra in ({"fused": True}, {"foreach": True}, {}):
        try:
            return torch.optim.AdamW(groups, **kw, **extra)  # type: ignore[arg-type]
        except (RuntimeError, ValueError, TypeError):
            continue
    raise TrainingError("model: cannot build AdamW over its parameters")  # pragma: no cover


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return int(cfg.warmup) if cfg.warmup >= 1 else round(cfg.warmup * total)


def lr_factor(step: int, schedule: str, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total: int) -> torch.optim.lr_scheduler.LambdaLR:
    w = warmup_steps(cfg, total)

    def factor(step: int) -> float:
        return lr_factor(step, cfg.schedule, w, total, cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def default_save_model(model: nn.Module, out_dir: Path, state_dict: Mapping[str, Any]) -> None:
    """Fallback export when the task gives no save_model_fn: the full state dict as model.safetensors."""
    import safetensors.torch

    (Path(out_dir) / MODEL_FILE).write_bytes(safetensors.torch.save(storable(state_dict)))


# what to do about a write that failed for an OS reason, by errno
_WRITE_FIXES = {errno.ENOSPC: "free space", errno.EDQUOT: "free space (disk quota)",
                errno.EROFS: "make it writable", errno.EACCES: "make it writable", errno.EPERM: "make it writable"}


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


TRIM_EVERY = 50  # optimizer steps between two release_free_memory() calls on CPU
# oneDNN keeps up to 1,024 per-shape primitives (with their buffers) by default: batches of many lengths fill it
# with gigabytes. 32 halved qa train's memory at no loss of speed (docs/benchmarks.md, "Memory growth"). It is
# read when oneDNN creates its first primitive, so it is set before the first training step; the environment wins.
ONEDNN_CACHE = "32"


def batch_counts(batch: Any) -> tuple[int, int]:
    """(examples, real tokens) of a batch, for throughput: from input_ids / attention_mask when present."""
    ids = mask = None
    if isinstance(batch, Mapping):
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
        if not isinstance(ids, torch.Tensor):
            ids = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 1), None)
            mask = None
    elif isinstance(batch, torch.Tensor):
        ids = batch
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        ids = batch[0]
    if ids is None or ids.dim() == 0:
        return 0, 0
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        return ids.shape[0], int(mask.sum())
    return ids.shape[0], ids.numel() if ids.dim() >= 2 else 0


# ---- the trainer ----------------------------------------------------------------------------------
class Trainer:
    """Train `model` with `loss_fn(model, batch) -> (mean loss, n_items)` over `train_data`.

    train_data: a BatchSource (`batches(epoch, start)` + `len`), or an indexable dataset of examples that
    is batched here with length bucketing (`collate_fn`, default: pad dict examples; `lengths` default:
    len(example["input_ids"])). The loss must be the mean over its `n_items` items (examples, or tokens
    for LM): accumulated micro-batches are then weighted by item count, so the update does not depend on
    how a step is split. eval_fn(model) -> {metric: value} runs with the model in eval mode, under
    no_grad, on every rank, and must return the same metrics on every rank (best model and early stopping
    are decided on each). save_model_fn(model, dir, state_dict) exports best/ and final/ on rank 0, from the
    strategy's full state dict (which a sharded model needs) or from the model itself (default: the state
    dict as safetensors). strategy: Single, DDP or FSDP; None picks Single or DDP from the process group,
    with find_unused_parameters telling DDP that the loss may not reach every trainable weight.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_data: BatchSource | Sequence[Any],
                 loss_fn: LossFn, eval_fn: EvalFn | None = None, save_model_fn: SaveModelFn | None = None,
                 collate_fn: Callable[[list[Any]], Any] | None = None, lengths: Sequence[int] | None = None,
                 strategy: Strategy | None = None, find_unused_parameters: bool = False) -> None:
        cfg = self.config = config
        if cfg.keep_best and eval_fn is None:
            raise TrainingError("train config field 'keep_best': set, but no eval_fn was given")
        self.loss_fn, self.eval_fn = loss_fn, eval_fn
        self.save_model_fn = save_model_fn or default_save_model
        if isinstance(train_data, BatchSource):
            self.source: BatchSource = train_data
        elif hasattr(train_data, "__getitem__") and hasattr(train_data, "__len__"):
            self.source = DatasetBatches(train_data, cfg.batch_size, collate_fn=collate_fn, lengths=lengths,
                                         seed=cfg.seed, bucket_size_multiplier=cfg.bucket_size_multiplier)
        else:
            raise TrainingError(
                f"train data: {type(train_data).__name__} is neither a dataset nor a batch source")
        self.batches_per_epoch = len(self.source)
        if self.batches_per_epoch < 1:
            raise TrainingError("train data: no batches (empty dataset, or fewer examples than ranks)")
        self.steps_per_epoch = -(-self.batches_per_epoch // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))

        self.strategy = strategy or choose_strategy(find_unused_parameters=find_unused_parameters)
        self.rank, self.world_size, self.is_main = self.strategy.rank, self.strategy.world_size, self.strategy.is_main
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)
        self.precision: Precision = resolve_precision(cfg.precision or "fp32", self.device)  # a resumed run may
        # replace it with the one it recorded (_restore)
        self.run_dir = Path(cfg.output_dir)
        fwd = self.strategy.setup(model, self.device)  # in place: moved (and sharded under FSDP)
        self.model = model  # the module itself: evaluated, and what the strategy saves and loads
        self.train_model = torch.compile(fwd) if cfg.compile else fwd  # what loss_fn receives
        self.optimizer = build_optimizer(self.model, cfg)  # after setup: FSDP replaces the parameters
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._pbar: Any = None

    # ---- public ------------------------------------------------------------------------------------
    def train(self, resume: bool | str = False, resume_from: str | Path | None = None) -> TrainResult:
        """Run (or continue) training. resume=True: from the newest checkpoint of output_dir (TrainingError
        when there is none); resume="auto": resume if there is one, else start fresh; resume_from: a run
        dir or a checkpoints/step-N dir."""
        if resume not in (True, False, "auto"):
            raise TrainingError(f"train(resume={resume!r}): expected True, False or 'auto'")
        ckpt = None
        if resume_from is not None:
            ckpt = resolve_resume(Path(resume_from))
        elif resume == "auto":
            ckpt = latest_checkpoint(self.run_dir)
        elif resume:
            ckpt = resolve_resume(self.run_dir)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clean_partial(self.run_dir / CHECKPOINTS)
            clean_partial(self.run_dir)
        state = self._fresh_start() if ckpt is None else self._restore(ckpt)
        self._say(self.precision.describe())
        if self.is_main:
            meta = {**self._config_record(), "precision_reason": self.precision.reason,
                    "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                    "batches_per_epoch": self.batches_per_epoch, "world_size": self.world_size,
                    "host": self._host_record()}
            atomic_write(self.run_dir / "trainer_config.json", json.dumps(meta, indent=1) + "\n")
        self._barrier()
        if state.step >= self.total_steps or state.stopped == "early_stopping":
            self._say(f"{self.run_dir}: nothing to do, training already ended at step {state.step} "
                      f"({state.stopped or 'completed'})")
            return self._result(state, state.stopped or "completed")
        return self._loop(state)

    # ---- setup -------------------------------------------------------------------------------------
    def _host_record(self) -> dict[str, Any]:
        """What this session ran on (trainer_config.json): step times only compare on the same hardware, and
        shared hosts of one name differ (docs/benchmarks.md: 3.6 against 1.8 s per QA step)."""
        if self.device.type == "cuda":
            return {"device": torch.cuda.get_device_name(self.device), "world_size": self.world_size}
        return {**cpu_identity(), "threads": torch.get_num_threads(), "world_size": self.world_size}

    def _config_record(self) -> dict[str, Any]:
        """The config as a run records it: precision resolved (auto -> fp32 or bf16), so that resuming, also
        on another machine, computes in the precision the run started in."""
        return {**self.config.to_dict(), "precision": self.precision.name, "bf16": self.precision.bf16}

    def _fresh_start(self) -> _State:
        if list_checkpoints(self.run_dir):
            if not self.config.overwrite:
                raise TrainingError(f"{self.run_dir}: already holds checkpoints; continue with --resume "
                                    f"{self.run_dir} (or train(resume=True)), or start over with --overwrite "
                                    "(or TrainConfig(overwrite=True))")
            if self.is_main:
                for name in (CHECKPOINTS, "best", "final"):
                    shutil.rmtree(self.run_dir / name, ignore_errors=True)
        if self.is_main:
            (self.run_dir / METRICS_FILE).write_text("")
            (self.run_dir / PLOT_FILE).unlink(missing_ok=True)
        seed_everything(self.config.seed + self.rank)
        return _State()

    def _restore(self, ckpt: Path) -> _State:
        ck = read_checkpoint(ckpt)
        try:
            self.strategy.load_state(self.model, self.optimizer, ck.model, ck.optimizer)
            self.scheduler.load_state_dict(ck.scheduler)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise TrainingError(f"{ckpt}: does not fit this model and optimizer ({one_line(e)})") from None
        state = _State.from_dict(ck.state)
        rng = ck.rng
        if len(rng) == self.world_size:
            set_rng_state(rng[self.rank])
        else:
            self._say(f"{ckpt}: saved with {len(rng)} rank(s), resuming on {self.world_size}: RNG reseeded, "
                      "the run will not be bit-identical")
            seed_everything(self.config.seed + self.rank + 1000 * state.step)
        saved = ck.state.get("config") or {}
        if self.config.precision == "auto":  # never flip precision silently: continue in the recorded one
            recorded = saved.get("precision")
            if recorded not in ("fp32", "bf16"):  # a run recorded before the precision field
                recorded = "bf16" if saved.get("bf16") else "fp32"
            self.precision = Precision(resolve_precision(recorded, self.device).name,
                                       f"auto: recorded by the run being resumed ({ckpt.name})")
        changed = sorted(k for k, v in self._config_record().items()
                         if k in saved and saved[k] != v and k not in _RESUME_FREE_FIELDS)
        if changed:
            self._say(f"{ckpt}: resuming with changed trainer config field(s) {changed}; "
                      "the run will differ from an uninterrupted one")
        if self.is_main:  # drop records the interrupted session wrote after this checkpoint
            path = self.run_dir / METRICS_FILE
            keep = [r for r in read_metrics(path) if r.get("step", 0) <= state.step]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))
        self._say(f"{self.run_dir}: resuming from {ckpt.name} "
                  f"(epoch {state.epoch}, batch {state.batch_index})")
        if state.stopped == "max_time":
            state.stopped = None
        return state

    # ---- the loop ----------------------------------------------------------------------------------
    def _loop(self, state: _State) -> TrainResult:
        cfg = self.config
        self._t_session = time.monotonic()
        self._elapsed0 = state.elapsed
        self._t_log, self._pause_s = time.monotonic(), 0.0
        dev = self.device
        self._acc = {k: torch.tensor(getattr(state, "acc_" + k), dtype=torch.float64, device=dev)
                     for k in ("loss", "items", "grad_norm")}
        self.model.train()
        self._pbar = tqdm(total=self.total_steps, initial=state.step,
                          disable=not (self.is_main and cfg.progress), desc="train", unit="step",
                          dynamic_ncols=True, file=sys.stderr)
        reason: str | None = None
        try:
            while state.step < self.total_steps and reason is None:
                if state.batch_index >= self.batches_per_epoch:
                    state.epoch, state.batch_index = state.epoch + 1, 0
                it = iter(self.source.batches(state.epoch, state.batch_index))
                while state.step < self.total_steps:
                    window = list(islice(it, cfg.grad_accum))
                    if not window:
                        state.batch_index = self.batches_per_epoch  # the source ran short: next epoch
                        break
                    self._train_step(window, state)
                    state.batch_index += len(window)
                    state.step += 1
                    if dev.type == "cpu" and state.step % TRIM_EVERY == 0:
                        release_free_memory()
                    self._pbar.update(1)
                    if state.step % cfg.log_every == 0:
                        self._log(state)
                    if self.eval_fn is not None and cfg.eval_every and state.step % cfg.eval_every == 0 \
                            and self._evaluate(state):
                        reason = "early_stopping"
                    if reason is None and state.step < self.total_steps and self._out_of_time():
                        reason = "max_time"  # never for a run that has just done its last step
                    if reason is not None:
                        break
                    if cfg.save_every and state.step % cfg.save_every == 0 and state.step < self.total_steps:
                        self._save(state)
            reason = reason or "completed"
            if state.acc_steps:
                self._log(state)
            if self.eval_fn is not None and state.last_eval_step != state.step:
                self._evaluate(state, final=True)
            state.stopped = reason
            self._export("final", state)
            self._save(state)
            self._write({"step": state.step, "epoch": self._epoch(state), "event": "end", "stopped": reason,
                         "elapsed": round(self._elapsed(), 3)})
            self._plot()
        finally:
            self._pbar.close()
        if reason == "max_time":
            self._say(f"{self.run_dir}: stopped at step {state.step}/{self.total_steps}: "
                      f"max_time_s={cfg.max_time_s} reached; checkpoint saved, continue with --resume "
                      f"{self.run_dir} (or train(resume=True))")
        elif reason == "early_stopping":
            self._say(f"{self.run_dir}: early stopping at step {state.step}: {cfg.keep_best} did not improve "
                      f"for {cfg.early_stopping_patience} evals (best {state.best_metric} "
                      f"at step {state.best_step})")
        return self._result(state, reason)

    def _train_step(self, window: list[Any], state: _State) -> None:
        dev = self.device
        model = self.train_model
        n_total = torch.zeros((), dtype=torch.float32, device=dev)
        samples = tokens = 0
        for i, batch in enumerate(window):
            s, t = batch_counts(batch)
            samples, tokens = samples + s, tokens + t
            batch = to_device(batch, dev)
            with self.strategy.sync_context(i == len(window) - 1):
                # record_function marks regions for benchmarks/step_profile.py (~1 us when no profiler runs)
                with torch.profiler.record_function("train.forward"), \
                        torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.precision.bf16):
                    out = self.loss_fn(model, batch)
                try:
                    loss, n = out
                except (TypeError, ValueError):
                    raise TrainingError("loss_fn: must return (loss, n_items)") from None
                # a count the loss_fn computed on the device stays there; a Python number is used as it is
                # (torch.as_tensor(n, device=cuda) would be a blocking host-to-device copy every micro-step)
                n = n.to(dev, torch.float32) if isinstance(n, torch.Tensor) else float(n)
                with torch.profiler.record_function("train.backward"):
                    (loss.float() * n).backward()  # sum over items; divided by the window's item count below
            self._acc["loss"] += loss.detach().double() * n
            self._acc["items"] += n
            n_total += n
        self.strategy.all_reduce(n_total)
        # sum over items / all items of the step; DDP and FSDP average over ranks, hence * world_size
        self._optimizer_step(state, self.world_size / torch.where(n_total > 0, n_total, 1.0), samples, tokens)

    def _optimizer_step(self, state: _State, grad_scale: torch.Tensor | float, samples: int, tokens: int) -> None:
        """Scale the summed gradients to a per-item mean, clip, step optimizer and schedule, and count."""
        with torch.profiler.record_function("train.optimizer"):
            grads = [p.grad for p in self._params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, grad_scale)
            gn = self.strategy.clip_grad_norm(self._params, self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._acc["grad_norm"] += gn.detach().double()
        state.acc_samples += samples
        state.acc_tokens += tokens
        state.acc_steps += 1

    # ---- logging, eval, saving ---------------------------------------------------------------------
    def _sync_acc(self, state: _State) -> None:
        for k, v in self._acc.items():
            setattr(state, "acc_" + k, float(v))

    def _log(self, state: _State) -> None:
        self._sync_acc(state)
        vals = torch.tensor([state.acc_loss, state.acc_items, state.acc_samples, state.acc_tokens],
                            dtype=torch.float64, device=self.device)
        self.strategy.all_reduce(vals)
        loss_sum, items, samples, tokens = vals.tolist()
        loss = loss_sum / items if items else float("nan")
        if not math.isfinite(loss) and items:
            raise TrainingError(f"step {state.step}: training loss is {loss} (non-finite); lower lr, "
                                "check the data or use precision fp32")
        dt = max(time.monotonic() - self._t_log - self._pause_s, 1e-9)  # training time only
        rec: dict[str, Any] = {
            "step": state.step, "epoch": round(self._epoch(state), 4), "loss": loss,
            "lr": self.scheduler.get_last_lr()[0], "grad_norm": state.acc_grad_norm / max(1, state.acc_steps),
            "samples_per_s": round(samples / dt, 2),
        }
        if tokens:
            rec["tokens_per_s"] = round(tokens / dt, 1)
        rec["elapsed"] = round(self._elapsed(), 3)
        self._write(rec)
        state.last_train_loss = loss
        postfix = {"loss": f"{loss:.4f}", "lr": f"{rec['lr']:.2e}", "ex/s": f"{rec['samples_per_s']:.1f}"}
        if tokens:
            postfix["tok/s"] = f"{rec['tokens_per_s']:.0f}"
        self._pbar.set_postfix(postfix, refresh=False)
        for k in self._acc:
            self._acc[k].zero_()
        state.acc_loss = state.acc_items = state.acc_samples = state.acc_tokens = state.acc_grad_norm = 0.0
        state.acc_steps = 0
        self._t_log, self._pause_s = time.monotonic(), 0.0

    def _evaluate(self, state: _State, final: bool = False) -> bool:
        """Run eval_fn, log it, keep the best model; True when early stopping says stop."""
        cfg = self.config
        assert self.eval_fn is not None
        t0 = time.monotonic()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                                 enabled=self.precision.bf16):
                raw = self.eval_fn(self.model)
        finally:
            self.model.train(was_training)
        try:
            metrics = {str(k): float(v) for k, v in dict(raw).items()}
        except (TypeError, ValueError):
            raise TrainingError("eval_fn: must return a dict of metric name -> number") from None
        state.last_eval_step, state.last_eval = state.step, metrics
        self._write({"step": state.step, "epoch": round(self._epoch(state), 4),
                     **{eval_key(k): v for k, v in metrics.items()},
                     "elapsed": round(self._elapsed(), 3)})
        if self._pbar is not None and self.is_main:
            self._pbar.write(f"step {state.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
                             file=sys.stderr)
        stop = False
        if cfg.keep_best:
            name = cfg.keep_best[len(EVAL_PREFIX):] if cfg.keep_best not in metrics and \
                cfg.keep_best.startswith(EVAL_PREFIX) else cfg.keep_best
            if name not in metrics:
                raise TrainingError(f"train config field 'keep_best': eval_fn returned no metric "
                                    f"{cfg.keep_best!r} (got {sorted(metrics)})")
            value, best = metrics[name], state.best_metric
            improves = best is None or (value > best if cfg.mode == "max" else value < best)
            better = math.isfinite(value) and improves
            if better:
                state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
                self._export("best", state, {"metric": name, "value": value, "step": state.step, "mode": cfg.mode})
            else:
                state.bad_evals += 1
                patience = cfg.early_stopping_patience
                stop = patience is not None and state.bad_evals >= patience
        if not final:
            self._plot()
        self._pause_s += time.monotonic() - t0  # eval, best-model export and plot are not training throughput
        return stop

    def _save(self, state: _State) -> None:
        t0 = time.monotonic()
        self._sync_acc(state)
        state.elapsed = self._elapsed()
        rng = self.strategy.all_gather_object(rng_state())
        model_sd = self.strategy.model_state_dict(self.model)  # collectives under FSDP: every rank
        optim_sd = self.strategy.optimizer_state_dict(self.model, self.optimizer)
        payload = {**dataclasses.asdict(state), "config": self._config_record(),
                   "total_steps": self.total_steps, "world_size": self.world_size}
        self._write_on_main(f"checkpoint step-{state.step}", lambda: save_checkpoint(
            self.run_dir, state.step, model_sd, optim_sd, self.scheduler.state_dict(), payload, rng=rng,
            keep=self.config.keep_checkpoints))
        self._pause_s += time.monotonic() - t0

    def _export(self, name: str, state: _State, best: dict[str, Any] | None = None) -> None:
        """Write RUN_DIR/name (best/ or final/) with save_model_fn, atomically, on rank 0."""
        sd = self.strategy.model_state_dict(self.model)  # collectives under FSDP: every rank

        def write() -> None:
            with atomic_dir(self.run_dir / name) as tmp:
                self.save_model_fn(self.model, tmp, sd)
                if best is not None:
                    (tmp / "best_metric.json").write_text(json.dumps(best) + "\n")

        self._write_on_main(f"{name}/ (step {state.step})", write)

    def _write_on_main(self, what: str, write: Callable[[], Any]) -> None:
        """Run `write` on rank 0; an OSError there (full disk, read-only fs, permissions) becomes one
        TrainingError on every rank, after the partial write was removed. Also a barrier."""
        failure = None
        if self.is_main:
            try:
                write()
            except OSError as e:
                failure = self._write_failed(what, e)
        failure = self.strategy.broadcast(failure)
        if failure is not None:
            raise TrainingError(failure)

    def _write_failed(self, what: str, e: OSError) -> str:
        cause = f"[Errno {e.errno}] {e.strerror}" if e.errno else one_line(e)
        fix = _WRITE_FIXES.get(e.errno or 0, "fix the cause")
        last = latest_checkpoint(self.run_dir)
        if last is None:
            return f"{self.run_dir}: could not write {what}: {cause}; no checkpoint was saved yet: {fix} and start over"
        return (f"{self.run_dir}: could not write {what}: {cause}; the last good checkpoint ({last.name}) is kept: "
                f"{fix} and continue with --resume {self.run_dir} (or train(resume=True))")

    def _plot(self) -> None:
        if self.is_main and self.config.plot:
            try:
                plot_metrics(self.run_dir / METRICS_FILE, self.run_dir / PLOT_FILE, title=self.run_dir.name)
            except OSError as e:
                raise TrainingError(self._write_failed(PLOT_FILE, e)) from None

    def _out_of_time(self) -> bool:
        if self.config.max_time_s is None:
            return False
        return self.strategy.any_rank(time.monotonic() - self._t_session >= self.config.max_time_s)

    def _write(self, rec: dict[str, Any]) -> None:
        if self.is_main:
            try:
                with open(self.run_dir / METRICS_FILE, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:
                raise TrainingError(self._write_failed(METRICS_FILE, e)) from None

    def _say(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(msg, file=sys.stderr)

    def _barrier(self) -> None:
        self.strategy.barrier()

    def _epoch(self, state: _State) -> float:
        return state.epoch + state.batch_index / self.batches_per_epoch

    def _elapsed(self) -> float:
        return self._elapsed0 + time.monotonic() - self._t_session

    def _result(self, state: _State, reason: str) -> TrainResult:
        return TrainResult(run_dir=self.run_dir, step=state.step, total_steps=self.total_steps,
                           epoch=self._epoch(state), stopped=reason, train_loss=state.last_train_loss,
                           eval_metrics=dict(state.last_eval), best_metric=state.best_metric,
                           best_step=state.best_step, elapsed_s=state.elapsed, precision=self.precision.name)
