"""What a training run writes into its directory besides checkpoints: metrics.jsonl, curves.png and the
exported models (best/, final/).

Rank 0 alone writes. A write that fails for an OS reason (full disk, read-only filesystem, permissions)
becomes one TrainingError on every rank that names what was kept and how to continue, so no rank hangs in
a collective waiting for one that died.
"""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from lmforge.errors import TrainingError
from lmforge.train.checkpoint import MODEL_FILE, latest_checkpoint, one_line, storable
from lmforge.train.plots import plot_metrics
from lmforge.train.strategy import Strategy

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
# what to do about a write that failed for an OS reason, by errno
WRITE_FIXES = {errno.ENOSPC: "free space", errno.EDQUOT: "free space (disk quota)",
               errno.EROFS: "make it writable", errno.EACCES: "make it writable", errno.EPERM: "make it writable"}


def default_save_model(model: nn.Module, out_dir: Path, state_dict: Mapping[str, Any]) -> None:
    """Fallback export when the task gives no save_model_fn: the full state dict as model.safetensors."""
    import safetensors.torch

    (Path(out_dir) / MODEL_FILE).write_bytes(safetensors.torch.save(storable(state_dict)))


class RunFiles:
    """The run directory's log, plot and rank-0 writes, with the one-line failure every rank raises."""

    def __init__(self, run_dir: Path, strategy: Strategy, plot: bool = True) -> None:
        self.run_dir, self.strategy, self.plot_enabled = run_dir, strategy, plot
        self.is_main = strategy.is_main

    def on_main(self, what: str, write: Callable[[], Any]) -> None:
        """Run `write` on rank 0; an OSError there becomes one TrainingError on every rank, after the partial
        write was removed (by `write`'s atomic helpers). Also a barrier."""
        failure = None
        if self.is_main:
            try:
                write()
            except OSError as e:
                failure = self.failure(what, e)
        failure = self.strategy.broadcast(failure)
        if failure is not None:
            raise TrainingError(failure)

    def failure(self, what: str, e: OSError) -> str:
        """The one line for a failed write: the cause, the last good checkpoint, and how to go on."""
        cause = f"[Errno {e.errno}] {e.strerror}" if e.errno else one_line(e)
        fix = WRITE_FIXES.get(e.errno or 0, "fix the cause")
        last = latest_checkpoint(self.run_dir)
        if last is None:
            return f"{self.run_dir}: could not write {what}: {cause}; no checkpoint was saved yet: {fix} and start over"
        return (f"{self.run_dir}: could not write {what}: {cause}; the last good checkpoint ({last.name}) is kept: "
                f"{fix} and continue with --resume {self.run_dir} (or train(resume=True))")

    def record(self, rec: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl (rank 0)."""
        if self.is_main:
            try:
                with open(self.run_dir / METRICS_FILE, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:
                raise TrainingError(self.failure(METRICS_FILE, e)) from None

    def plot(self) -> None:
        """Redraw curves.png from metrics.jsonl (rank 0, unless plotting is off)."""
        if self.is_main and self.plot_enabled:
            try:
                plot_metrics(self.run_dir / METRICS_FILE, self.run_dir / PLOT_FILE, title=self.run_dir.name)
            except OSError as e:
                raise TrainingError(self.failure(PLOT_FILE, e)) from None

    def say(self, msg: str) -> None:
        """A line on stderr from rank 0, above the progress bar."""
        if self.is_main:
            tqdm.write(msg, file=sys.stderr)
