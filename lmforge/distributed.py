"""Multi-process training: join torchrun's process group, run one-time work on rank 0, shard with FSDP.

torchrun starts one process per device and describes the job in environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `init_distributed()` reads them, picks the backend (gloo on CPU,
nccl for CUDA tensors with gloo beside it for CPU objects), pins the CUDA device of the local rank and
joins the group; outside torchrun it does nothing, so every training verb can call it unconditionally.
Once the group exists, the shared Trainer wraps the model in DistributedDataParallel, each rank reads its
own shard of the batches, and rank 0 alone writes files and shows progress.

`FSDPTrainer` is the Trainer for models sharded with FSDP (torch.distributed.fsdp.fully_shard): parameters,
gradients and optimizer state are split across ranks and gathered layer by layer for compute. It keeps the
Trainer's loop and changes what FSDP needs: no DDP wrapper, gradient sync switched off inside an
accumulation window, checkpoints and exported models gathered to full tensors on every rank (collectives)
before rank 0 writes them, and restored by loading the full state into the sharded model on every rank.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import LmforgeError, TrainingError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.backend is not None


def dist_state() -> DistInfo:
    """The current process group as a DistInfo (rank 0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))
    return DistInfo()


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise TrainingError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes; a no-op (rank 0 of 1) when not launched by torchrun.

    device: the training device flag (auto | cpu | cuda[:N]); CUDA ranks use nccl and cuda:LOCAL_RANK.
    Safe to call twice. The group is destroyed at exit.
    """
    if dist.is_available() and dist.is_initialized():
        return dist_state()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    if not dist.is_available():
        raise TrainingError("launched by torchrun, but this torch build has no torch.distributed")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if cuda:
        n = torch.cuda.device_count()
        if local >= n:
            raise TrainingError(f"LOCAL_RANK={local} but this machine has {n} CUDA device(s): start at most {n} "
                                "processes per node (--nproc-per-node)")
        torch.cuda.set_device(local)
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    atexit.register(_destroy)
    return DistInfo(rank, world, local, backend)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def broadcast_from_leader(obj: T) -> T:
    """Rank 0's value of `obj` on every rank (e.g. a run directory named after the clock); `obj` itself
    when not distributed."""
    if dist_state().world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leader_first(fn: Callable[[], T], *, local: bool = True) -> T:
    """Run `fn` on the leader (local rank 0 of each node, or global rank 0) while the others wait, then on
    the others; `fn` must be get-or-build (a cache), so the others find the leader's result.

    An error on the leader is raised on every rank (same class and message for lmforge errors), so a bad
    input stops the whole job with one line instead of leaving the other ranks waiting forever.
    """
    info = dist_state()
    if info.world_size == 1:
        return fn()
    leader = info.local_rank == 0 if local else info.rank == 0
    result: Any = None
    failure: tuple[str, str] | None = None
    if leader:
        try:
            result = fn()
        except LmforgeError as e:
            failure = (type(e).__name__, str(e))
        except BaseException as e:  # noqa: BLE001 - reported to the other ranks, then re-raised below
            failure = ("", f"rank {info.rank}: {type(e).__name__}: {e}")
            gathered: list[Any] = [None] * info.world_size
            dist.all_gather_object(gathered, failure)
            raise
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, failure)
    first = next((f for f in gathered if f is not None), None)
    if first is not None:
        raise _error_class(first[0])(first[1])
    return fn() if not leader else result


def _error_class(name: str) -> type[LmforgeError]:
    import lmforge.errors as errors

    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, LmforgeError) else TrainingError


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few numbers over ranks (float64); identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---- FSDP ------------------------------------------------------------------------------------------
def fsdp_shard(model: nn.Module, layers: list[nn.Module], device: torch.device, bf16: bool = False) -> nn.Module:
    """Shard `model` in place with FSDP2: each of `layers` is one unit (gathered for its own compute),
    the root holds the rest (embeddings, final norm, the tied LM head). Call before building the optimizer."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        raise TrainingError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6), "
                            f"this is torch {torch.__version__}") from None
    if not (dist.is_available() and dist.is_initialized()):
        raise TrainingError("--fsdp needs a process group: launch with torchrun --nproc-per-node N")
    model.to(device)
    kw: dict[str, Any] = {}
    if bf16:  # compute in bf16, reduce gradients and keep master weights in float32
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    model._lmforge_fsdp = True  # type: ignore[assignment]
    return model


def is_fsdp(model: nn.Module) -> bool:
    return bool(getattr(model, "_lmforge_fsdp", False))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All ranks call it (it gathers); rank 0 gets full CPU tensors, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: dict[str, torch.Tensor],
                    optim_sd: dict[str, Any] | None) -> None:
    """Every rank passes the same full state dicts; each keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


class _StateHolder(nn.Module):
    """Stands in for the sharded model when the Trainer saves or loads a checkpoint: state_dict() returns
    the gathered full tensors and load_state_dict() keeps what the file held, for load_full_state()."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.sd = sd
        self.loaded: dict[str, torch.Tensor] | None = None

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self.sd)

    def load_state_dict(self, sd: Any, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self.loaded = dict(sd)
        missing = sorted(set(self.sd) - set(sd))
        unexpected = sorted(set(sd) - set(self.sd))
        return nn.modules.module._IncompatibleKeys(missing, unexpected)


class _OptimHolder:
    """Same for the optimizer: a full (name-keyed) optimizer state dict in and out."""

    def __init__(self, sd: dict[str, Any] | None) -> None:
        self.sd, self.loaded = sd, None

    def state_dict(self) -> dict[str, Any] | None:
        return self.sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loaded = sd


def _build_trainer_without_ddp(trainer: Any, init: Callable[[], None]) -> None:
    """Run Trainer.__init__ seeing a world of 1 (so it builds no DDP wrapper), then restore the real
    rank and world size. Everything else the constructor does is the same for FSDP; the DDP-specific
    step (no_sync) is replaced by FSDPTrainer._train_step."""
    import lmforge.train.trainer as trainer_mod

    info = dist_state()
    real = trainer_mod.dist_info
    trainer_mod.dist_info = lambda: (info.rank, 1)
    try:
        init()
    finally:
        trainer_mod.dist_info = real
    trainer.rank, trainer.world_size, trainer.is_main = info.rank, info.world_size, info.rank == 0
    trainer._ddp = info.world_size > 1  # the Trainer's all-reduces and barriers stay on


def make_fsdp_trainer(model: nn.Module, config: Any, train_data: Any, loss_fn: Any, eval_fn: Any,
                      save_model_fn: Callable[[dict[str, torch.Tensor], Path], None]) -> Any:
    """A Trainer for an FSDP-sharded `model` (see the module docstring).

    save_model_fn(full_state_dict, dir) exports best/ and final/ on rank 0 from gathered tensors (the
    sharded model itself cannot be read by one rank). An eval_fn is required: the export of the final
    model uses the state gathered at the last evaluation, the one point where every rank is in step
    before rank 0 writes.
    """
    from lmforge.train import Trainer

    if eval_fn is None:
        raise TrainingError("--fsdp needs an evaluation function (validation data)")

    class FSDPTrainer(Trainer):
        _full: dict[str, torch.Tensor] = {}

        def __init__(self) -> None:
            _build_trainer_without_ddp(self, lambda: Trainer.__init__(
                self, model, config, train_data, loss_fn, eval_fn=eval_fn,
                save_model_fn=lambda _m, d: save_model_fn(self._full, d)))

        def _train_step(self, window: list[Any], state) -> None:
            """Trainer._train_step for sharded parameters: FSDP's own gradient-sync switch instead of
            DDP's no_sync; Trainer._optimizer_step makes the DTensor gradient norm a plain number."""

            from lmforge.train.trainer import batch_counts, to_device

            cfg, dev = self.config, self.device
            n_total = torch.zeros((), dtype=torch.float32, device=dev)
            samples = tokens = 0
            for i, batch in enumerate(window):
                s, t = batch_counts(batch)
                samples, tokens = samples + s, tokens + t
                batch = to_device(batch, dev)
                self.model.set_requires_gradient_sync(i == len(window) - 1)  # reduce once per window
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss, n = self.loss_fn(self.train_model, batch)
                n = torch.as_tensor(n, dtype=torch.float32, device=dev)
                (loss.float() * n).backward()
                self._acc["loss"] += loss.detach().double() * n
                self._acc["items"] += n
                n_total += n
            dist.all_reduce(n_total)
            # FSDP averaged over ranks like DDP: sum over items / all items of the step
            self._optimizer_step(state, self.world_size / max(float(n_total), 1.0), samples, tokens)

        def _evaluate(self, state, final: bool = False) -> bool:
            self._full = full_state_dict(self.model)  # collective: every rank evaluates at the same step
            return super()._evaluate(state, final)

        def _save(self, state) -> None:
            full_model = full_state_dict(self.model)
            full_optim = full_optimizer_state_dict(self.model, self.optimizer)
            real_model, real_optim = self.model, self.optimizer
            self.model, self.optimizer = _StateHolder(full_model), _OptimHolder(full_optim)  # type: ignore
            try:
                super()._save(state)
            finally:
                self.model, self.optimizer = real_model, real_optim

        def _restore(self, ckpt: Path):
            # meta placeholders under the sharded model's names: nothing to gather, nothing allocated
            names = list(self.model.state_dict().keys())
            holder = _StateHolder({k: torch.empty(0, device="meta") for k in names})
            oholder = _OptimHolder(None)
            real_model, real_optim = self.model, self.optimizer
            self.model, self.optimizer = holder, oholder  # type: ignore[assignment]
            try:
                state = super()._restore(ckpt)
            finally:
                self.model, self.optimizer = real_model, real_optim
            load_full_state(self.model, self.optimizer, holder.loaded or {}, oholder.loaded)
            return state

    return FSDPTrainer()
