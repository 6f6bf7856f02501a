"""Batch-invariant inference: a row's numbers do not depend on which other rows share its call.

Why it needs care: a float GEMM library picks its kernel (and so each output's summation order) by the shape of
the call, so row 0 of a 1-row product can differ from row 0 of an 8-row one in the last bits, and a greedy
decode that flips one argmax on such a bit changes the whole continuation. Two properties fix that here:

- float32 linears (`nn.Linear` and the tied LM head) run lmforge's f32_linear where lmforge's CPU kernels are
  used (csrc/linear_avx2.cpp: each output's summation order is fixed by its code, whatever the rows, and the
  weights stream once for all rows; speeds in docs/benchmarks.md).
  Otherwise float linears run their rows in fixed blocks of `block` rows, the last one padded with zeros, so
  every call has the same shape whatever the batch is. That a row's result then does not depend on its
  position in the block or on its neighbours is measured once per weight shape (`rows_block`), not assumed:
  where it does, the block is 1 row (a matrix-vector product per row, always the same call).
- attention of one new token per row (decode steps) covers exactly that row's own columns: lmforge's
  decode_attn skips masked columns by itself; elsewhere `Attention` runs SDPA on each row's column slice.
Quantized layers are made invariant by their policy (lmforge.quant.policy.cover_rows: the integer kernels take
every decode row). What the server guarantees with this, and the cost: docs/serving.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.layers import Attention

BLOCKS = (8, 4, 2, 1)  # candidate row blocks, largest first: the first that the probe finds invariant is used
KERNEL = -1  # a "block" that means lmforge's f32_linear (invariant for any number of rows)


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: int) -> torch.Tensor:
    """F.linear(x, weight, bias) computed in calls of exactly `block` rows, or by f32_linear (block KERNEL):
    x (..., K) -> (..., N)."""
    if block == KERNEL:
        if x.dtype == weight.dtype == torch.float32 and weight.is_contiguous():
            y = torch.ops.lmforge.f32_linear(x, weight)  # (..., N)
            return y if bias is None else y + bias
        block = 1  # (operands it does not take, e.g. under autocast: one row per call is invariant too)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)  # (M, K)
    M = x2.shape[0]
    pad = -M % block
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, K)])  # (M + pad, K)
    y = torch.cat([F.linear(x2[i: i + block], weight, bias) for i in range(0, M + pad, block)])  # (M + pad, N)
    return y[:M].reshape(*x.shape[:-1], weight.shape[0])


def _same_at(w: torch.Tensor, x0: torch.Tensor, ref: torch.Tensor, block: int, p: int, g: torch.Generator) -> bool:
    xs = torch.randn(block, x0.shape[1], generator=g).to(x0.dtype)  # (block, K) random neighbours
    xs[p] = x0[0]
    return torch.equal(F.linear(xs, w)[p], ref)


@functools.cache  # a fact of this torch build and thread count for one shape, found once: a memo, not a setting
def _probe(n: int, k: int, dtype: torch.dtype, threads: int) -> int:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g).to(dtype)
    x0 = torch.randn(1, k, generator=g).to(dtype)
    for block in BLOCKS:
        ref = F.linear(torch.cat([x0, torch.randn(block - 1, k, generator=g).to(dtype)]), w)[0]
        if all(_same_at(w, x0, ref, block, p, g) for _ in range(3) for p in range(block)):
            return block  # x0 at every position, with other neighbours each time, gave the same row
    return 1


def rows_block(weight: torch.Tensor, kernel: bool = True) -> int:
    """KERNEL for a float32 CPU weight where lmforge's CPU kernels are used (and `kernel`), else the largest
    block of BLOCKS in which a row's product with `weight` does not depend on its position or its neighbours on
    this machine (measured with random operands of the weight's shape); 1 always qualifies."""
    if weight.device.type != "cpu":
        return 1
    if kernel and weight.dtype == torch.float32 and weight.is_contiguous():
        from lmforge import cpu_kernels

        if cpu_kernels.available():
            return KERNEL
    n, k = weight.shape
    return _probe(int(n), int(k), weight.dtype, torch.get_num_threads())


def _blocked_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.numel() // max(1, x.shape[-1]) > self.max_rows:  # prefill chunks: one call, the same for a given chunk
        return F.linear(x, self.weight, self.bias)
    return linear_rows(x, self.weight, self.bias, self.row_block)


_STATE = ("invariant", "forward", "row_block", "max_rows", "row_block_max")  # what set_batch_invariant sets


def invariance_key(model: nn.Module) -> tuple:
    """What set_batch_invariant decided for `model`, as a value (a trace of its decode step bakes it in)."""
    return tuple(m.row_block if "forward" in m.__dict__ else bool(getattr(m, "invariant", False))
                 for m in model.modules() if isinstance(m, (Attention, nn.Linear)))


def saved_invariance(model: nn.Module) -> Callable[[], None]:
    """A function that puts back what set_batch_invariant may change on `model`'s modules, as they are now (so
    that one call can decode invariantly and leave the model as it found it, e.g. shared with a server)."""
    saved = [(m, {k: m.__dict__[k] for k in _STATE if k in m.__dict__}) for m in model.modules()]

    def restore() -> None:
        for m, attrs in saved:
            for k in _STATE:
                if k in attrs:
                    m.__dict__[k] = attrs[k]
                else:
                    m.__dict__.pop(k, None)
    return restore


def set_batch_invariant(model: nn.Module, on: bool, max_rows: int = 64) -> None:
    """Make `model`'s decode steps batch-invariant (on) or give it back its plain calls (off).

    on: each float `nn.Linear` runs calls of up to `max_rows` rows (decode steps) in fixed row blocks; each
    Attention of one new token per row covers only the row's own columns; the tied or float LM head is blocked
    the same way (`Transformer.row_block`)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.invariant = on
        elif type(m) is nn.Linear and m.weight.is_floating_point():
            if on:
                m.row_block, m.max_rows = rows_block(m.weight.detach()), max_rows
                m.forward = functools.partial(_blocked_forward, m)
            elif "forward" in m.__dict__:
                del m.forward
        if hasattr(m, "lm_logits") and hasattr(m, "row_block"):  # a Transformer: its float LM head, if any
            m.row_block, m.row_block_max = 0, max_rows
            if on and m.quant_head is None:
                head = m.embed.tok.weight if m.lm_head is None else m.lm_head.weight
                # (a float32 copy of another dtype's head only for the probe: bf16 emulated on CPU is slow)
                m.row_block = rows_block(head.detach().float(), kernel=head.dtype == torch.float32)
