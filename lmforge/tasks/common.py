"""What every training task shares: the run's tail (resume check, config record, Trainer, best/final pick,
publishing, summary) in `run_training`, and the LoRA options with their injection and export.

A task's train() function builds its data, model, loss and eval function, then hands them to
run_training as a `TaskRun`; nothing after that point is task-specific.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.errors import CheckpointError, ConfigError, DataError, TrainingError
from lmforge.io import TMP_PREFIX, atomic_write, fsync_path


# ---- LoRA options shared by classify and finetune --------------------------------------------------------
@dataclass
class LoraArgs:
    """LoRA knobs; task configs inherit them (and may change the defaults) so the CLI derives one set of flags."""

    lora: bool = False  # train low-rank adapters on a frozen model instead of every weight
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,v"  # comma-separated module names (q,k,v,o,gate,up,down,fc1,fc2) or all-linear
    save_adapters_only: bool = False  # save PEFT adapters (+ head) alone instead of a merged model

    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


def apply_lora(model: nn.Module, args: LoraArgs) -> list[str]:
    """Inject adapters when args.lora (freezing the rest); returns the adapted module names."""
    if not args.lora:
        return []
    from lmforge.model.lora import LoraConfig, inject_lora

    return inject_lora(model, LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                         targets=args.targets()))


QUANTIZE_BASE = ("none", "auto", "8", "4")  # finetune --quantize: how the frozen base of a LoRA run is held


def check_quantized_base(quantize: str, args: LoraArgs) -> None:
    """--quantize other than none: a frozen integer base, so LoRA only, saved as adapters (before loading)."""
    if quantize not in QUANTIZE_BASE:
        raise ConfigError(f"--quantize {quantize!r}: not one of {', '.join(QUANTIZE_BASE)}")
    if quantize != "none" and not args.lora:
        raise ConfigError(f"--quantize {quantize}: a quantized base is frozen, so only LoRA adapters train; add "
                          "--lora (or --quantize none for full fine-tuning)")


def quantize_base(model: nn.Module, quantize: str) -> str | None:
    """Hold the base in int8/int4 for LoRA over it (QLoRA's idea): "8"|"4" quantize the float weights now (the
    decode presets: int4 blocks keep an int8 head); "auto" keeps what load_checkpoint(quantized=True) built from
    a quantized GGUF's blocks. Returns the path's description ("int4 (from Q4_1 file)") or None (float)."""
    if quantize in ("8", "4"):
        from lmforge.quant import DECODE_PRESETS, quantize_model

        quantize_model(model, **DECODE_PRESETS[int(quantize)])
    spec = getattr(model, "quant_spec", None)
    if spec is None:
        return None
    from lmforge.io import fixed_mmap_threshold

    fixed_mmap_threshold()  # the gradient path's 8 MiB weight blocks would otherwise stay in glibc's heap
    return spec.describe()


def export_model(model: nn.Module, out_dir: Path, tokenizer, args: LoraArgs, base_model: str,
                 extra_config: dict[str, Any] | None = None) -> None:
    """A loadable model dir: PEFT adapters + tokenizer (adapters-only), else a HF dir with LoRA merged into a
    copy (the training model keeps its adapters)."""
    if args.lora and args.save_adapters_only:
        from lmforge.checkpoints.peft import save_adapters

        save_adapters(model, out_dir, base_model=base_model)
        tokenizer.save(out_dir)
        return
    from lmforge.checkpoints import save_pretrained

    export = model
    if args.lora:
        from lmforge.model.lora import merge_lora

        export = merge_lora(copy.deepcopy(model), inplace=True)
    save_pretrained(export, out_dir, tokenizer=tokenizer, extra_config=extra_config)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


# ---- the shared tail ------------------------------------------------------------------------------------
SaveFn = Callable[[nn.Module, Path, Mapping[str, Any]], None]


@dataclass
class TaskRun:
    """One task's training, ready to run: what run_training needs and nothing else."""

    task: str  # names the task in messages and is the config file's stem: RUN_DIR/{task}_config.json
    config: dict[str, Any]  # the task config, recorded in the run dir
    model: nn.Module
    train_data: Any  # a dataset of features, or a BatchSource
    loss_fn: Callable
    save_fn: SaveFn  # (model, out_dir, full state dict) -> writes an exportable model
    eval_fn: Callable | None = None
    eval_metrics: Sequence[str] = ()  # names eval_fn returns: keep_best is checked against them up front
    n_eval: int | None = None  # validation rows (None: the task has no row count); 0 is an error
    marker: str = "config.json"  # a file every export writes: best/ counts only when it holds one
    collate_fn: Callable | None = None
    lengths: Sequence[int] | None = None
    strategy: Any = None  # a lmforge.train.strategy.Strategy; None: chosen from the process group
    find_unused_parameters: bool = False  # DDP: the forward skips some trainable weights (BERT's pooler)
    on_start: Callable | None = None  # Trainer's on_start(trainer): its device and precision are final there
    write_config: bool = True  # False when the task records its own config (pretrain on resume)
    summary: dict[str, Any] = field(default_factory=dict)  # task-specific summary fields


def check_resumable(run_dir: Path) -> None:
    """--resume needs a checkpoint: say so before loading models or data."""
    from lmforge.train import list_checkpoints

    if not list_checkpoints(run_dir):
        raise TrainingError(f"{run_dir}: no checkpoint to resume from (expected {run_dir}/checkpoints/step-N); "
                            "start a new run without --resume")


def check_validation(n_eval: int, task: str) -> None:
    """A run needs validation rows to pick and report its model: say so before training, not after."""
    if n_eval == 0:
        raise DataError(f"{task}: the validation set is empty; give more training rows, a larger "
                        "--eval-fraction, or --eval-data")


def run_training(run: TaskRun, tc, resume: bool = False,
                 finish: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train `run` under TrainConfig `tc`; returns the summary also written to RUN_DIR/summary.json.

    finish(result) may add summary fields computed after training (e.g. throughput read from metrics).
    """
    from lmforge.train import Trainer
    from lmforge.train.strategy import dist_info

    run_dir = Path(tc.output_dir)
    if resume:
        check_resumable(run_dir)
    if run.n_eval is not None:
        check_validation(run.n_eval, run.task)
    if run.eval_metrics:
        tc.best_metric(run.eval_metrics, run.task)  # a keep_best the task does not evaluate: before training
    main = dist_info().is_main  # under torchrun, rank 0 alone writes the run directory
    if main and run.write_config:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / f"{run.task}_config.json", run.config)
    trainer = Trainer(run.model, tc, run.train_data, run.loss_fn, eval_fn=run.eval_fn, save_model_fn=run.save_fn,
                      collate_fn=run.collate_fn, lengths=run.lengths, strategy=run.strategy,
                      find_unused_parameters=run.find_unused_parameters, on_start=run.on_start)
    result = trainer.train(resume=resume)
    chosen = run_dir / "best" if (run_dir / "best" / run.marker).exists() else run_dir / "final"
    summary = {"run_dir": str(run_dir), "model_dir": str(chosen), "steps": result.step,
               "stopped": result.stopped, "elapsed_s": round(result.elapsed_s, 1),
               "validation": result.eval_metrics, "best_metric": result.best_metric, "best_step": result.best_step,
               **run.summary, **(finish(result) if finish else {})}
    if main:
        publish_model_dir(run_dir, chosen)
        write_json(run_dir / "summary.json", summary)
    return summary


def publish_model_dir(run_dir: Path, src: Path) -> None:
    """Expose the chosen model (best/ or final/) at the run dir root through hard links: no second copy,
    and the root loads as a Hugging Face directory. Each file is swapped in atomically."""
    for f in src.iterdir():
        if not f.is_file():
            continue
        tmp = run_dir / f"{TMP_PREFIX}{f.name}-link-{os.getpid()}"  # a leftover is removed by clean_partial
        tmp.unlink(missing_ok=True)
        try:
            os.link(f, tmp)
        except OSError:  # no hard links here (another filesystem): an atomic copy instead
            atomic_write(run_dir / f.name, lambda t, f=f: shutil.copyfile(f, t))
            continue
        os.replace(tmp, run_dir / f.name)
    fsync_path(run_dir)


def find_run_dir(run_dir: str | Path, marker: str) -> Path | None:
    """The directory holding `marker` (a task's run-info file): RUN_DIR itself, else its best/ or final/.

    None when the path exists but holds no marker (the caller names its task in the error); a missing path
    is a CheckpointError here."""
    p = Path(run_dir)
    if not p.exists():
        raise CheckpointError(f"{p}: no such run directory")
    for d in (p, p / "best", p / "final"):
        if (d / marker).exists():
            return d
    return None
