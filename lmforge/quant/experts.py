"""A mixture's decode token through its experts in two kernel calls (llama.cpp's and vLLM's "mul_mat_id"):
one product for the k chosen experts' gate|up (the token's x against their weights side by side, each expert's
blocks where they are), silu(gate) * up for all k at once, and one for the k downs, each expert's row of the
activations against its own weights, summed with the routing weights inside the kernel.

Instead of ~16 calls per layer with Python and thread start-up between them, and the same numbers: each output
is the integer product the expert's own call computes (the kernels' sums do not depend on the other rows or
parts of a call), and the k outputs are weighted and added in ascending expert order, a multiply and an add each,
as the loop in lmforge.model.moe and transformers' index_add_ do. Held by MoE.grouped (set by `group_experts`);
MoE runs its loop wherever `GroupedExperts` returns None (no lmforge kernels, LoRA on an expert, a gradient,
the "dequant" policy, another activation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupedExperts(nn.Module):
    """Stateless: reads the experts' own kernel operands (their `kernel_parts()`), cached per expert and
    rebuilt when an expert's layers change (replaced, or new integers loaded)."""

    def __init__(self, experts: nn.ModuleList) -> None:
        super().__init__()
        self.experts = tuple(experts)  # a plain tuple: not submodules (no second copy in the state dict)
        self._ops: dict[int, tuple] = {}
        self.training = False  # as QuantLinear's: an inference path until a model's .train() says otherwise

    def _operands(self, e: int) -> tuple | None:
        """Expert e's (check, signature, gate|up parts, down parts), or None where its layers do not run on
        lmforge's kernels. check: the layers and their generations (new integers loaded), to notice a change."""
        mlp = self.experts[e]
        gu, down = getattr(mlp, "gate_up", None), mlp.down
        layers = (mlp.gate, mlp.up, down)
        check = (layers, tuple(getattr(p, "_gen", None) for p in layers))
        held = self._ops.get(e, ())
        if held and all(a is b for a, b in zip(held[0][0], layers)) and held[0][1] == check[1]:
            return held[1]
        ops = None
        if (gu is not None and hasattr(gu, "kernel_parts") and gu.serves(mlp.gate, mlp.up)
                and hasattr(down, "kernel_parts") and mlp.act is F.silu):
            a, b = gu.kernel_parts(), down.kernel_parts()
            if a is not None and b is not None and a[0] == b[0]:
                # signature: bits, scale dtype, whether the mins are derived (Q4_0), per list: one call's parts
                # must agree
                sig = tuple((p[0], p[2][0].dtype, p[3][0].numel() == 0 if p[3] else None) for p in (a, b))
                ops = (sig, a, b, gu, down)
        self._ops[e] = (check, ops)
        return ops

    def forward(self, h: torch.Tensor, experts: list[int], route: torch.Tensor) -> torch.Tensor | None:
        """h (1, D) float32, experts in ascending order, route (k,) float32 their weights ->
        sum_j route[j] * expert_j(h) (1, D), or None where the experts' own loop has to run."""
        if h.dtype is not torch.float32 or not h.is_contiguous() or (
                (self.training or h.requires_grad) and torch.is_grad_enabled()):  # the layers' training paths
            return None
        ops = [self._operands(e) for e in experts]
        if any(o is None or o[0] != ops[0][0] or not (_integer(o[3].policy) and _integer(o[4].policy)) for o in ops):
            return None
        bits = ops[0][1][0]
        a = torch.ops.lmforge  # (the ops exist: kernel_parts said the experts run on them)
        gw = [w for o in ops for w in o[1][1]]
        gs = [s for o in ops for s in o[1][2]]
        dw = [w for o in ops for w in o[2][1]]
        ds = [s for o in ops for s in o[2][2]]
        k = len(experts)
        if bits == 4:
            gu = a.q4_mm(h, gw, gs, [m for o in ops for m in o[1][3]], 1)  # (1, k * 2F)
            act = a.silu_mul(gu.view(k, -1))  # (k, F)
            return a.q4_mm_route(act, dw, ds, [m for o in ops for m in o[2][3]], route)  # (1, D)
        gu = a.q8_mm_parts(h, gw, gs, 1)  # (1, k * 2F)
        return a.q8_mm_route(a.silu_mul(gu.view(k, -1)), dw, ds, route)  # (1, D)

    def all_operands(self) -> tuple | None:
        """Every expert's operands side by side for `moe_mm` (bits, gate|up weights, scales, mins, down weights,
        scales, mins, parts per expert for gate|up and for down), or None unless every expert runs on lmforge's
        integer kernels with one signature. A walk over all experts: for a captured step (made once), not per
        eager call."""
        ops = [self._operands(e) for e in range(len(self.experts))]
        if not ops or any(o is None or o[0] != ops[0][0] or not (_integer(o[3].policy) and _integer(o[4].policy))
                          for o in ops):
            return None
        per_up, per_down = len(ops[0][1][1]), len(ops[0][2][1])
        if any(len(o[1][1]) != per_up or len(o[2][1]) != per_down for o in ops):
            return None
        bits = ops[0][1][0]
        if bits not in (4, 8):
            return None
        parts = [[t for o in ops for t in o[j][i]] if bits == 4 or i < 3 else [] for j in (1, 2) for i in (1, 2, 3)]
        return (bits, *parts, per_up, per_down)

    def routed(self, h: torch.Tensor, idx: torch.Tensor, route: torch.Tensor) -> torch.Tensor | None:
        """h (N, D) float32 tokens, idx (N, k) their experts, route (N, k) float32 their weights -> (N, D): each
        row as `forward` computes it alone, with the routing read inside one op (what a traced step records);
        None where `all_operands` is None."""
        if h.dtype is not torch.float32 or (self.training or h.requires_grad) and torch.is_grad_enabled():
            return None
        ops = self.all_operands()
        if ops is None:
            return None
        bits, uw, us, um, dw, ds, dm, per_up, per_down = ops
        return torch.ops.lmforge.moe_mm(h, idx, route.float(), uw, us, um, dw, ds, dm, per_up, per_down, bits)

    def _apply(self, fn, recurse=True):
        self._ops = {}  # moved or cast: the experts rebuild their operands
        return super()._apply(fn, recurse)


def _integer(policy) -> bool:
    """Whether `policy` sends one row to the integer products (what each expert's own call would run)."""
    return policy.mode == "kernel" or (policy.mode == "auto" and policy.max_m_own >= 1)


def group_experts(model: nn.Module) -> int:
    """Give each mixture of `model` (a module with `experts` and a `grouped` slot) a GroupedExperts. Returns how
    many."""
    n = 0
    for m in model.modules():
        if hasattr(m, "grouped") and isinstance(getattr(m, "experts", None), nn.ModuleList):
            m.grouped = GroupedExperts(m.experts)
            n += 1
    return n
