"""TrainConfig: every knob of the training loop, validated once here; the Trainer and the tasks read the
resolved values (precision with its bf16 alias folded in, the device, the metric keep_best watches)."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.device import resolve_device
from lmforge.errors import TrainingError
from lmforge.train.plots import EVAL_PREFIX
from lmforge.train.precision import PRECISIONS

SCHEDULES = ("linear", "cosine", "constant")
FIELD = "train config field"  # how errors name a field: "train config field 'lr': ..." (the CLI names its flag)


def field_error(name: str, why: str) -> TrainingError:
    return TrainingError(f"{FIELD} {name!r}: {why}")


def precision_from(precision: str | None, bf16: bool) -> str:
    """The precision asked for, with the older bf16 switch folded in: None means bf16 if `bf16` else fp32;
    bf16=True with auto means bf16, with fp32 a conflict."""
    if precision is None:
        return "bf16" if bf16 else "fp32"
    if precision not in PRECISIONS:
        raise field_error("precision", f"unsupported {precision!r} (expected one of {', '.join(PRECISIONS)})")
    if bf16 and precision == "fp32":
        raise field_error("bf16", "an alias of precision 'bf16'; it conflicts with precision 'fp32'")
    return "bf16" if bf16 else precision


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
        bad = field_error
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        self.precision = precision_from(self.precision, self.bf16)  # type: ignore[assignment]
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

    def best_metric(self, metrics: Collection[str], source: str = "eval_fn") -> str | None:
        """The name keep_best watches among `metrics` (as the eval function returns them): keep_best itself, or
        keep_best without its eval_ prefix (metrics.jsonl's spelling). None when keep_best is unset; a
        TrainingError naming the field and `source` (what returns the metrics) when it is neither."""
        name = self.keep_best
        if not name or name in metrics:
            return name or None
        if name.startswith(EVAL_PREFIX) and name[len(EVAL_PREFIX):] in metrics:
            return name[len(EVAL_PREFIX):]
        raise field_error("keep_best", f"{name!r} is not among the metrics {source} returns ({', '.join(metrics)})")

    def resolved_device(self) -> torch.device:
        """The training device (lmforge.device.resolve_device); a ConfigError naming this field when the machine
        lacks it."""
        return resolve_device(self.device, f"{FIELD} 'device'")

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
