"""Which device a command runs on: the one place that turns "auto" / "cpu" / "cuda[:N]" into a torch.device,
refusing in one line a device this machine does not have (instead of torch's assertion deep inside a load)."""

from __future__ import annotations

import os

import torch

from lmforge.errors import ConfigError

DEVICES = "auto | cpu | cuda | cuda:N"


def resolve_device(name: str | torch.device | None = "auto", what: str = "--device") -> torch.device:
    """auto: cuda if available else cpu; under torch.distributed a bare "cuda" becomes cuda:LOCAL_RANK.
    A device torch cannot use here raises ConfigError naming `what` (the flag or config field)."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{what}: unknown device {name!r} (expected {DEVICES})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"{what}: {name!r}: {why}; use cpu (or auto)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"{what}: {name!r}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
        if dev.index is None:
            dist = torch.distributed
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % n if world > 1 else 0))
            dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{what}: {name!r}: torch sees no Apple GPU here; use cpu (or auto)")
    elif dev.type != "cpu":
        raise ConfigError(f"{what}: device {name!r} is not supported (expected {DEVICES})")
    return dev


def inference_dtype(device: torch.device) -> torch.dtype:
    """The float dtype to load weights in for inference when none is asked for: bfloat16 on a GPU with native
    bf16 (half the memory traffic, tensor cores), float32 elsewhere (CPU decoding has its own int4/int8 path)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
