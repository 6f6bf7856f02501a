"""Which precision a training run computes in: fp32, or bf16 autocast (weights and optimizer stay float32).

`auto` picks bf16 only where the hardware multiplies bf16 natively: CUDA devices that support it, and CPUs with
avx512_bf16 or AMX, where bf16 matmul is much faster than float32 (see docs/benchmarks.md). Elsewhere bf16 is
emulated and slower than float32, so auto stays in float32. The detection lives in two small functions that
tests mock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.device import cpu_flags
from lmforge.errors import TrainingError

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 flags of native bf16 matmul, the strongest first
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Precision:
    """A resolved precision and why it was chosen (printed at the start of a run)."""

    name: str  # fp32 | bf16
    reason: str  # e.g. "auto: CPU has avx512_bf16", "as configured", "auto: recorded by the run being resumed"

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def describe(self) -> str:
        return f"precision: {self.name} ({self.reason})"


def cpu_has_native_bf16() -> str | None:
    """The CPU flag that gives native bf16 matmul (amx_bf16, avx512_bf16), or None."""
    flags = cpu_flags(CPUINFO)
    return next((f for f in CPU_BF16_FLAGS if f in flags), None)


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether this CUDA device computes in bf16 natively (Ampere and newer)."""
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def resolve_precision(name: str, device: torch.device) -> Precision:
    """auto | fp32 | bf16 on `device` -> the precision to train in. An explicit bf16 on a CUDA device without
    bf16 support is an error; on a CPU without native bf16 it runs (emulated, slower) as asked."""
    if name not in PRECISIONS:
        raise TrainingError(f"train config field 'precision': unsupported {name!r} "
                            f"(expected one of {', '.join(PRECISIONS)})")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError(f"train config field 'precision': device {device} has no bfloat16 support")
    if name != "auto":
        return Precision(name, "as configured")
    if device.type == "cuda":
        if cuda_has_bf16(device):
            return Precision("bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return Precision("fp32", f"auto: {torch.cuda.get_device_name(device)} has no native bf16")
    if device.type == "cpu":
        flag = cpu_has_native_bf16()
        if flag:
            return Precision("bf16", f"auto: CPU has {flag}")
        return Precision("fp32", "auto: CPU has no avx512_bf16 or amx_bf16")
    return Precision("fp32", f"auto: no bf16 autocast on {device.type}")
