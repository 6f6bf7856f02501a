"""Which device a command runs on: the one place that turns "auto" / "cpu" / "cuda[:N]" into a torch.device,
refusing in one line a device this machine does not have (instead of torch's assertion deep inside a load);
and what the CPU is (feature flags, identity), which picks CPU kernels and is recorded with runs."""

from __future__ import annotations

import os
from pathlib import Path

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


SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
_NUMBERS = {"cpu family": "cpu_family", "model": "cpu_model"}  # /proc/cpuinfo key -> record key


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This CPU's x86 feature flags. Linux: the flags line of /proc/cpuinfo; elsewhere (or when it cannot be
    read) the capabilities torch's cpuinfo reports (torch >= 2.8), else none."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    try:
        caps = torch.cpu.get_capabilities()  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return frozenset()
    return frozenset(f for f, on in caps.items() if on)


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """Which CPU this is, as runs and benchmarks record it: the model name, and the family / model numbers
    that tell apart CPUs sharing a name (a first-generation "AMD EPYC", family 23 model 1, has half the FMA
    width of later ones), plus the SIMD flags that choose kernels."""
    out: dict[str, object] = {}
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, val = (part.strip() for part in line.partition(":"))
        if key == "model name" and "cpu" not in out:
            out["cpu"] = val
        elif key in _NUMBERS and _NUMBERS[key] not in out and val.isdigit():
            out[_NUMBERS[key]] = int(val)
        elif not line.strip() and out:  # the first processor's block is enough
            break
    flags = cpu_flags(cpuinfo)
    out["simd"] = [f for f in SIMD_FLAGS if f in flags]
    return out
