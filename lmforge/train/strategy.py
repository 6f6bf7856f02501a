"""How a model is placed on devices and kept in sync across processes: Single, DDP and FSDP strategies.

The Trainer runs one loop and asks its strategy for everything that differs between one process, data
parallel (DistributedDataParallel) and sharded (FSDP2) training: the module the loss is computed with,
whether a micro-step syncs gradients, the gradient norm, the collectives of the loop, and the full state
dicts that checkpoints and exported models are made of. This is litgpt's (Fabric's) strategy idea, kept to
what lmforge needs.

The process-group helpers live here too. torchrun starts one process per device and describes the job in
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `init_distributed()` reads
them, picks the backend (gloo on CPU, nccl for CUDA tensors with gloo beside it for CPU objects), pins the
CUDA device of the local rank and joins the group; outside torchrun it does nothing, so every training verb
can call it unconditionally. `dist_info()` is the one place that says which rank this process is.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lmforge.device import resolve_device
from lmforge.errors import LmforgeError, TrainingError

T = TypeVar("T")
StateDict = dict[str, Any]


# ---- the process group ---------------------------------------------------------------------------------
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


def dist_info() -> DistInfo:
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
        return dist_info()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    if not dist.is_available():
        raise TrainingError("launched by torchrun, but this torch build has no torch.distributed")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    cuda = resolve_device(device, "device").type == "cuda"
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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_from_leader(obj: T) -> T:
    """Rank 0's value of `obj` on every rank (e.g. a run directory named after the clock); `obj` itself
    when not distributed."""
    if not _distributed():
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
    info = dist_info()
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
    if not _distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---- FSDP sharding -------------------------------------------------------------------------------------
def fsdp_shard(model: nn.Module, layers: Sequence[nn.Module], device: torch.device, bf16: bool = False) -> nn.Module:
    """Shard `model` in place with FSDP2: each of `layers` is one unit (gathered for its own compute),
    the root holds the rest (embeddings, final norm, the tied LM head). Call before building the optimizer."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        raise TrainingError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6), "
                            f"this is torch {torch.__version__}") from None
    if not _distributed():
        raise TrainingError("--fsdp needs a process group of 2 or more: launch with torchrun --nproc-per-node N")
    model.to(device)
    kw: dict[str, Any] = {}
    if bf16:  # compute in bf16, reduce gradients and keep master weights in float32
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def is_fsdp(model: nn.Module) -> bool:
    """Whether `model` was sharded by fully_shard (which makes its class a subclass of FSDPModule)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return isinstance(model, FSDPModule)


def fill_tied(model: nn.Module, sd: Mapping[str, Any]) -> StateDict:
    """`sd` plus the names of tied parameters it lacks (a file keeps one name per shared tensor)."""
    out = dict(sd)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for group in names.values():
        present = next((n for n in group if n in out), None)
        if present is not None:
            for n in group:
                out.setdefault(n, out[present])
    return out


# ---- strategies ----------------------------------------------------------------------------------------
class Strategy:
    """One process on one device; the base of DDP and FSDP, which override what differs.

    Lifecycle: `setup(model, device)` once, before the optimizer is built over model.parameters(); the
    Trainer then computes the loss with the module setup returned and saves/loads through the state-dict
    methods. The collectives (all_reduce, all_gather_object, broadcast, barrier) are no-ops here.
    """

    def __init__(self) -> None:
        self.info = dist_info()

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def setup(self, model: nn.Module, device: torch.device, bf16: bool = False) -> nn.Module:
        """Move `model` to `device` (in place); returns the module the loss function receives. bf16: the run
        computes in bf16 (the Trainer's precision; FSDP shards for it)."""
        return model.to(device)

    def sync_context(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Entered around each micro-step's forward and backward: gradients sync on the last one only."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
        """Clip to max_norm (None or 0: no clipping) and return the total norm before clipping, a plain tensor."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"), foreach=True)

    # collectives: identities for one process
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` in place over ranks and return it."""
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (e.g. out of time: all stop at the same step)."""
        return flag

    def all_gather_object(self, obj: T) -> list[T]:
        return [obj]

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank; also a barrier."""
        return obj

    def barrier(self) -> None:
        pass

    # state
    def model_state_dict(self, model: nn.Module) -> StateDict:
        """The full model state dict (under FSDP: gathered; call it on every rank, rank 0 gets the tensors)."""
        return model.state_dict()

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> StateDict:
        return optimizer.state_dict()

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: Mapping[str, Any],
                   optim_sd: Mapping[str, Any] | None) -> None:
        """Load full state dicts (as model_state_dict/optimizer_state_dict made them); every rank passes the
        same. A name mismatch raises RuntimeError (torch's strict load)."""
        model.load_state_dict(fill_tied(model, model_sd), strict=True)
        if optimizer is not None and optim_sd is not None:
            optimizer.load_state_dict(dict(optim_sd))


class Single(Strategy):
    """One process, one device: the model as it is."""


class _Collective(Strategy):
    """The collectives of a real process group, shared by DDP and FSDP."""

    def __init__(self) -> None:
        super().__init__()
        if not _distributed():
            raise TrainingError(f"{type(self).__name__} strategy: needs a process group of 2 or more; launch with "
                                "torchrun --nproc-per-node N")
        self._device = torch.device("cpu")  # where flags travel: the backend's device (set by setup)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([float(flag)], device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def all_gather_object(self, obj: T) -> list[T]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


class DDP(_Collective):
    """Data parallel: every rank holds the whole model, DistributedDataParallel averages the gradients.

    find_unused_parameters: for tasks whose forward skips some trainable weights (BERT's pooler under mean
    pooling or span QA, an untied LM head under a classifier); DDP stalls otherwise.
    """

    def __init__(self, find_unused_parameters: bool = False) -> None:
        super().__init__()
        self.find_unused_parameters = find_unused_parameters
        self._module: nn.Module | None = None

    def setup(self, model: nn.Module, device: torch.device, bf16: bool = False) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        model.to(device)
        self._device = device
        ids = [device.index] if device.type == "cuda" else None
        self._module = DistributedDataParallel(model, device_ids=ids,
                                               find_unused_parameters=self.find_unused_parameters)
        return self._module

    def sync_context(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        if is_last_micro_step or self._module is None:
            return contextlib.nullcontext()
        return self._module.no_sync()


class FSDP(_Collective):
    """Sharded: parameters, gradients and optimizer state split over the ranks with FSDP2 (fully_shard).

    layers: the units gathered one at a time (default: every Transformer block of the model). bf16: compute in
    bfloat16 with float32 master weights and gradient reduction (None: when the Trainer's precision is bf16,
    so the shards and the autocast agree). Checkpoints and exports are gathered to full
    tensors (collectives: every rank calls the state-dict methods) and restored by loading the full state
    into the sharded model on every rank, so a run dir looks the same as without FSDP.
    """

    def __init__(self, layers: Sequence[nn.Module] | None = None, bf16: bool | None = None) -> None:
        super().__init__()
        self.layers, self.bf16 = layers, bf16
        self._module: nn.Module | None = None

    def setup(self, model: nn.Module, device: torch.device, bf16: bool = False) -> nn.Module:
        from lmforge.model.transformer import Block

        layers = self.layers if self.layers is not None else [m for m in model.modules() if isinstance(m, Block)]
        self._device = device
        self._module = fsdp_shard(model, layers, device, bf16=bf16 if self.bf16 is None else self.bf16)
        return self._module

    @contextlib.contextmanager
    def _gradient_sync(self, on: bool) -> Iterator[None]:
        assert self._module is not None, "FSDP.setup() first"
        self._module.set_requires_gradient_sync(on)  # type: ignore[operator]
        yield

    def sync_context(self, is_last_micro_step: bool) -> contextlib.AbstractContextManager:
        return self._gradient_sync(is_last_micro_step)  # reduce-scatter once per accumulation window

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
        gn = super().clip_grad_norm(params, max_norm)
        return gn.full_tensor() if hasattr(gn, "full_tensor") else gn  # a DTensor over the shards

    def model_state_dict(self, model: nn.Module) -> StateDict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> StateDict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, model_sd: Mapping[str, Any],
                   optim_sd: Mapping[str, Any] | None) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, fill_tied(model, model_sd), options=opts)
        if optimizer is not None and optim_sd is not None:
            set_optimizer_state_dict(model, optimizer, dict(optim_sd), options=opts)


def choose_strategy(fsdp: bool = False, fsdp_layers: Sequence[nn.Module] | None = None,
                    find_unused_parameters: bool = False, bf16: bool | None = None) -> Strategy:
    """FSDP when asked, DDP under a process group of 2 or more, else Single. bf16 and fsdp_layers: FSDP only
    (bf16 None: shard for the precision the Trainer resolves)."""
    if fsdp:
        return FSDP(fsdp_layers, bf16=bf16)
    if _distributed():
        return DDP(find_unused_parameters=find_unused_parameters)
    return Single()
