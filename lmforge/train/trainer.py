"""One training loop for every task: the task brings a model, a loss, a batch source and an eval function.

The loop knows nothing about tasks. It does gradient accumulation weighted by item counts, clipping,
warmup + decay schedules (lmforge.train.optim), bf16 autocast (precision auto | fp32 | bf16:
lmforge.train.precision), periodic eval with best-model keeping and early stopping, atomic checkpoints that
resume bit-exactly (weights, optimizer, scheduler, every RNG, data position), a time budget, metrics.jsonl and
a PNG of the curves. What differs between one process, DDP and FSDP is its Strategy's business
(lmforge.train.strategy): the loop never asks which one it has. Rank 0 alone writes files and shows progress
(lmforge.train.runfiles).

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

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.device import cpu_identity
from lmforge.errors import TrainingError
from lmforge.io import atomic_dir, atomic_write, clean_partial, release_free_memory
from lmforge.train.batching import BatchSource, DatasetBatches, batch_counts, to_device
from lmforge.train.checkpoint import (
    CHECKPOINTS,
    latest_checkpoint,
    list_checkpoints,
    one_line,
    read_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lmforge.train.config import TrainConfig, precision_from
from lmforge.train.optim import build_optimizer, build_scheduler
from lmforge.train.plots import eval_key, read_metrics
from lmforge.train.precision import Precision, resolve_precision
from lmforge.train.runfiles import METRICS_FILE, PLOT_FILE, RunFiles, default_save_model
from lmforge.train.state import RunState, TrainResult
from lmforge.train.strategy import Strategy, choose_strategy

# trainer-config fields that may change between a run and its resumption without a warning
_RESUME_FREE_FIELDS = {"output_dir", "progress", "plot", "max_time_s", "device", "log_every", "overwrite",
                       "compile", "epochs", "max_steps", "eval_every", "save_every", "keep_checkpoints",
                       "early_stopping_patience"}

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, "int | float | torch.Tensor"]]
EvalFn = Callable[[nn.Module], Mapping[str, float]]
SaveModelFn = Callable[[nn.Module, Path, Mapping[str, Any]], None]  # (model, out_dir, full state dict)


# ---- helpers --------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device): call before building a model to train."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


TRIM_EVERY = 50  # optimizer steps between two release_free_memory() calls on CPU
# oneDNN keeps up to 1,024 per-shape primitives (with their buffers) by default: batches of many lengths fill it
# with gigabytes; 32 bounds that at no loss of speed (see docs/benchmarks.md, "Memory growth"). It is read when
# oneDNN creates its first primitive, so it is set before the first training step; the environment wins.
ONEDNN_CACHE = "32"


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
    on_start(trainer) runs on every rank once train() has settled the session (fresh or resumed: `precision`
    and `device` final), before the first step.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_data: BatchSource | Sequence[Any],
                 loss_fn: LossFn, eval_fn: EvalFn | None = None, save_model_fn: SaveModelFn | None = None,
                 collate_fn: Callable[[list[Any]], Any] | None = None, lengths: Sequence[int] | None = None,
                 strategy: Strategy | None = None, find_unused_parameters: bool = False,
                 on_start: Callable[[Trainer], None] | None = None) -> None:
        cfg = self.config = config
        if cfg.keep_best and eval_fn is None:
            raise TrainingError("train config field 'keep_best': set, but no eval_fn was given")
        self.loss_fn, self.eval_fn, self.on_start = loss_fn, eval_fn, on_start
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
        self._device = cfg.resolved_device()
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        else:
            os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)
        self._precision = resolve_precision(cfg.precision, self._device)  # a resumed auto run: _restore
        self.run_dir = Path(cfg.output_dir)
        self.files = RunFiles(self.run_dir, self.strategy, plot=cfg.plot)
        # in place: moved (and sharded under FSDP, in bf16 compute when the run is)
        fwd = self.strategy.setup(model, self._device, bf16=self._precision.bf16)
        self.model = model  # the module itself: evaluated, and what the strategy saves and loads
        self.train_model = torch.compile(fwd) if cfg.compile else fwd  # what loss_fn receives
        self.optimizer = build_optimizer(self.model, cfg)  # after setup: FSDP replaces the parameters
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._pbar: Any = None

    # ---- public ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device this trainer computes on (TrainConfig.device resolved on this machine)."""
        return self._device

    @property
    def precision(self) -> Precision:
        """The precision the run computes in; final once train() has started (a resumed run with precision
        auto continues in the one it recorded)."""
        return self._precision

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
        self.files.say(self.precision.describe())
        if self.is_main:
            meta = {**self._config_record(), "precision_reason": self.precision.reason,
                    "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                    "batches_per_epoch": self.batches_per_epoch, "world_size": self.world_size,
                    "host": self._host_record()}
            atomic_write(self.run_dir / "trainer_config.json", json.dumps(meta, indent=1) + "\n")
        self.strategy.barrier()
        if self.on_start is not None:
            self.on_start(self)
        if state.step >= self.total_steps or state.stopped == "early_stopping":
            self.files.say(f"{self.run_dir}: nothing to do, training already ended at step {state.step} "
                           f"({state.stopped or 'completed'})")
            return self._result(state, state.stopped or "completed")
        return self._loop(state)

    # ---- setup -------------------------------------------------------------------------------------
    def _host_record(self) -> dict[str, Any]:
        """What this session ran on (trainer_config.json): step times only compare on the same hardware, and
        hosts of one CPU name can differ (see docs/benchmarks.md)."""
        if self.device.type == "cuda":
            return {"device": torch.cuda.get_device_name(self.device), "world_size": self.world_size}
        return {**cpu_identity(), "threads": torch.get_num_threads(), "world_size": self.world_size}

    def _config_record(self) -> dict[str, Any]:
        """The config as a run records it: precision resolved (auto -> fp32 or bf16), so that resuming, also
        on another machine, computes in the precision the run started in."""
        return {**self.config.to_dict(), "precision": self.precision.name, "bf16": self.precision.bf16}

    def _fresh_start(self) -> RunState:
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
        return RunState()

    def _restore(self, ckpt: Path) -> RunState:
        ck = read_checkpoint(ckpt)
        try:
            self.strategy.load_state(self.model, self.optimizer, ck.model, ck.optimizer)
            self.scheduler.load_state_dict(ck.scheduler)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise TrainingError(f"{ckpt}: does not fit this model and optimizer ({one_line(e)})") from None
        state = RunState.from_dict(ck.state)
        rng = ck.rng
        if len(rng) == self.world_size:
            set_rng_state(rng[self.rank])
        else:
            self.files.say(f"{ckpt}: saved with {len(rng)} rank(s), resuming on {self.world_size}: RNG reseeded, "
                           "the run will not be bit-identical")
            seed_everything(self.config.seed + self.rank + 1000 * state.step)
        saved = ck.state.get("config") or {}
        if self.config.precision == "auto":  # never flip precision silently: continue in the recorded one
            recorded = saved.get("precision")
            if recorded not in ("fp32", "bf16"):  # a run recorded before the precision field
                recorded = precision_from(None, bool(saved.get("bf16")))
            self._precision = Precision(resolve_precision(recorded, self._device).name,
                                        f"auto: recorded by the run being resumed ({ckpt.name})")
        changed = sorted(k for k, v in self._config_record().items()
                         if k in saved and saved[k] != v and k not in _RESUME_FREE_FIELDS)
        if changed:
            self.files.say(f"{ckpt}: resuming with changed trainer config field(s) {changed}; "
                           "the run will differ from an uninterrupted one")
        if self.is_main:  # drop records the interrupted session wrote after this checkpoint
            path = self.run_dir / METRICS_FILE
            keep = [r for r in read_metrics(path) if r.get("step", 0) <= state.step]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))
        self.files.say(f"{self.run_dir}: resuming from {ckpt.name} "
                       f"(epoch {state.epoch}, batch {state.batch_index})")
        if state.stopped == "max_time":
            state.stopped = None
        return state

    # ---- the loop ----------------------------------------------------------------------------------
    def _loop(self, state: RunState) -> TrainResult:
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
            self.files.record({"step": state.step, "epoch": self._epoch(state), "event": "end", "stopped": reason,
                              "elapsed": round(self._elapsed(), 3)})
            self.files.plot()
        finally:
            self._pbar.close()
        if reason == "max_time":
            self.files.say(f"{self.run_dir}: stopped at step {state.step}/{self.total_steps}: "
                           f"max_time_s={cfg.max_time_s} reached; checkpoint saved, continue with --resume "
                           f"{self.run_dir} (or train(resume=True))")
        elif reason == "early_stopping":
            self.files.say(f"{self.run_dir}: early stopping at step {state.step}: {cfg.keep_best} did not improve "
                           f"for {cfg.early_stopping_patience} evals (best {state.best_metric} "
                           f"at step {state.best_step})")
        return self._result(state, reason)

    def _train_step(self, window: list[Any], state: RunState) -> None:
        dev = self.device
        model = self.train_model
        n_total = torch.zeros((), dtype=torch.float32, device=dev)
        samples = tokens = 0
        for i, batch in enumerate(window):
            s, t = batch_counts(batch)
            samples, tokens = samples + s, tokens + t
            batch = to_device(batch, dev)
            with self.strategy.sync_context(i == len(window) - 1):
                # record_function marks regions for benchmarks/step_profile.py (next to free when no profiler runs)
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

    def _optimizer_step(self, state: RunState, grad_scale: torch.Tensor | float, samples: int, tokens: int) -> None:
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
    def _sync_acc(self, state: RunState) -> None:
        for k, v in self._acc.items():
            setattr(state, "acc_" + k, float(v))

    def _log(self, state: RunState) -> None:
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
        self.files.record(rec)
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

    def _evaluate(self, state: RunState, final: bool = False) -> bool:
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
        self.files.record({"step": state.step, "epoch": round(self._epoch(state), 4),
                          **{eval_key(k): v for k, v in metrics.items()}, "elapsed": round(self._elapsed(), 3)})
        if self._pbar is not None and self.is_main:
            self._pbar.write(f"step {state.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
                             file=sys.stderr)
        stop = False
        name = cfg.best_metric(metrics)
        if name is not None:
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
            self.files.plot()
        self._pause_s += time.monotonic() - t0  # eval, best-model export and plot are not training throughput
        return stop

    def _save(self, state: RunState) -> None:
        t0 = time.monotonic()
        self._sync_acc(state)
        state.elapsed = self._elapsed()
        rng = self.strategy.all_gather_object(rng_state())
        model_sd = self.strategy.model_state_dict(self.model)  # collectives under FSDP: every rank
        optim_sd = self.strategy.optimizer_state_dict(self.model, self.optimizer)
        payload = {**state.to_dict(), "config": self._config_record(),
                   "total_steps": self.total_steps, "world_size": self.world_size}
        self.files.on_main(f"checkpoint step-{state.step}", lambda: save_checkpoint(
            self.run_dir, state.step, model_sd, optim_sd, self.scheduler.state_dict(), payload, rng=rng,
            keep=self.config.keep_checkpoints))
        self._pause_s += time.monotonic() - t0

    def _export(self, name: str, state: RunState, best: dict[str, Any] | None = None) -> None:
        """Write RUN_DIR/name (best/ or final/) with save_model_fn, atomically, on rank 0."""
        sd = self.strategy.model_state_dict(self.model)  # collectives under FSDP: every rank

        def write() -> None:
            with atomic_dir(self.run_dir / name) as tmp:
                self.save_model_fn(self.model, tmp, sd)
                if best is not None:
                    (tmp / "best_metric.json").write_text(json.dumps(best) + "\n")

        self.files.on_main(f"{name}/ (step {state.step})", write)

    def _out_of_time(self) -> bool:
        if self.config.max_time_s is None:
            return False
        return self.strategy.any_rank(time.monotonic() - self._t_session >= self.config.max_time_s)

    def _epoch(self, state: RunState) -> float:
        return state.epoch + state.batch_index / self.batches_per_epoch

    def _elapsed(self) -> float:
        return self._elapsed0 + time.monotonic() - self._t_session

    def _result(self, state: RunState, reason: str) -> TrainResult:
        return TrainResult(run_dir=self.run_dir, step=state.step, total_steps=self.total_steps,
                           epoch=self._epoch(state), stopped=reason, train_loss=state.last_train_loss,
                           eval_metrics=dict(state.last_eval), best_metric=state.best_metric,
                           best_step=state.best_step, elapsed_s=state.elapsed, precision=self.precision.name,
                           device=str(self.device))
