"""Where a training run stands: RunState, the loop position a checkpoint carries to resume exactly, and
TrainResult, what Trainer.train() returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STOP_REASONS = ("completed", "early_stopping", "max_time")


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
    precision: str = "fp32"  # what the run computed in: fp32 | bf16 (Trainer.precision)
    device: str = "cpu"  # what it ran on, e.g. cpu, cuda:0 (Trainer.device)


@dataclass
class RunState:
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
    def from_dict(cls, d: Mapping[str, Any]) -> RunState:
        """From a checkpoint's record; fields it does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
