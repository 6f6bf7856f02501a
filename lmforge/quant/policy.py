"""Which matmul a quantized layer runs, as a value: each QuantLinear / FusedQuantLinear holds a frozen
KernelPolicy (`.policy`), its forward passes it to the dispatch in lmforge.quant.kernels, and nothing global
changes when a caller picks another path for one model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

from torch import nn

from lmforge.quant.numerics import QuantError

MODES = ("auto", "kernel", "dequant")


@dataclass(frozen=True)
class KernelPolicy:
    """Which matmul QuantLinear runs. "auto": the packed kernel while rows (M = batch x tokens) <= max_m,
    else dequantize + dense matmul; "kernel" / "dequant" force one path where it can run (tests, accuracy)."""

    mode: str = "auto"
    max_m_int8: int = 32  # above this a float32 GEMM on the dequantized weight is faster (prefill)
    max_m_int4: int = 256  # the int4 kernel is a tiled GEMM: as fast as float32 up to a few hundred rows
    max_m_own: int = 32  # lmforge's AVX2 kernels: above this their chunked dequantize + float32 GEMM wins

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QuantError(f"kernel mode {self.mode!r} is not one of {' | '.join(MODES)}")


DEFAULT_POLICY = KernelPolicy()  # what a quantized layer starts with (frozen: a constant, not a setting)


def _holders(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` (itself included) that hold a policy: QuantLinear and FusedQuantLinear."""
    return [m for m in model.modules() if isinstance(getattr(m, "policy", None), KernelPolicy)]


def set_kernel_policy(model: nn.Module, policy: KernelPolicy) -> None:
    """Give every quantized layer of `model` (QuantLinear, FusedQuantLinear) this policy."""
    for m in _holders(model):
        m.policy = policy


def kernel_policy(model: nn.Module) -> KernelPolicy:
    """The policy `model`'s quantized layers use (the first one's), or DEFAULT_POLICY when it has none."""
    return next((m.policy for m in _holders(model)), DEFAULT_POLICY)


def cover_rows(model: nn.Module, rows: int) -> None:
    """Let every call of up to `rows` rows take the same path as one row does (the integer / packed kernels), so
    that a decode step's row gives the same numbers in a batch of any size up to `rows` (batch invariance: on
    those paths each output's sum runs over K in one fixed order, whatever the tile shape). Only raises limits."""
    for m in _holders(model):
        p = m.policy
        m.policy = replace(p, max_m_int8=max(p.max_m_int8, rows), max_m_int4=max(p.max_m_int4, rows),
                           max_m_own=max(p.max_m_own, rows))


@contextlib.contextmanager
def kernel_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Force "kernel", "dequant" or "auto" on `model`'s quantized layers for the block (e.g. to measure accuracy),
    then give each layer back its own policy. A bad mode raises QuantError even where no layer is quantized."""
    replace(kernel_policy(model), mode=mode)  # validates
    held = [(m, m.policy) for m in _holders(model)]
    for m, old in held:
        m.policy = replace(old, mode=mode)
    try:
        yield
    finally:
        for m, old in held:
            m.policy = old
