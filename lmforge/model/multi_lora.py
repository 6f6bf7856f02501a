"""Several LoRA adapters over one frozen base, chosen per batch row (the batched LoRA product of vLLM's punica).

One model call computes the base product once for every row, then each row's own adapter product:
y[b] = base(x)[b] + (x[b] A_s^T) B_s^T * scale_s, with s the adapter slot of row b (slot 0: the base, no adapter).

Design choices:
- `MultiLoraLinear` wraps whatever the base layer is (nn.Linear, QuantLinear, ...) and calls its forward as is:
  the base's integers or floats are never copied or dequantized here. The base stays the `base` submodule, so
  its parameters remain the model's (device and dtype checks, the decode runtime's weight walk).
- Adapter tensors are plain attributes, not parameters or buffers: loading one changes no state-dict name and no
  tensor that a captured decode step holds. Per layer, every loaded adapter is kept twice: its own (r, in) and
  (out, r) matrices (a call where all rows share one adapter runs exactly LoraLinear's two products), and a
  zero-padded stack (slots, in, r_max) / (slots, r_max, out) gathered per row for mixed calls (two bmm's).
- Which slot each row uses is set per thread (`AdapterRows.use`) right before a model call: the server's worker
  sets its batch rows, while a classification on another thread sets its own; a thread that set nothing runs
  the base. A captured (traced) step records whatever the rows were when it was traced, so callers only replay
  one for base rows.
- int4 q|k|v and gate|up fused kernels (`FusedQuantLinear`) keep running: `MultiLoraFused` serves the wrapped
  parts with the one fused base call and adds each wrapped part's adapter product to its columns.
- Banks are swapped whole (one attribute assignment), and a slot is only reused once no row runs it, so a step
  that reads one layer's old bank and the next layer's new one still computes every running row right.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError, GenerationError

__all__ = ["AdapterRef", "AdapterRows", "LayerAdapter", "MultiLoraFused", "MultiLoraLinear", "RowPlan", "clear_slot",
           "install_multi_lora", "multi_lora_layers", "set_slot"]

TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "fc1", "fc2")  # lmforge.model.lora.LORA_TARGETS


@dataclass(frozen=True)
class AdapterRef:
    """What a request row carries: the adapter's name, its slot in the layers, and a key unique to this load (the
    prefix cache keeps keys/values per key, so a reloaded adapter of the same name never reuses the old ones)."""

    name: str
    slot: int
    key: int


@dataclass(frozen=True)
class RowPlan:
    """The adapter slots of one model call's rows: `uniform` when every row has the same slot; `index` the slot
    of each row (None: any number of rows, all `uniform`)."""

    slots: tuple[int, ...]
    uniform: int | None
    index: torch.Tensor | None  # (B,) long on the model's device


class AdapterRows:
    """Per-thread row -> slot assignment read by every MultiLoraLinear of one model (slot 0 = the base)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._local = threading.local()

    def use(self, slots: list[int] | tuple[int, ...] | None) -> bool:
        """Set the slots of the next calls' rows (in row order) on this thread; None or all 0: the base.
        Returns whether any row has an adapter."""
        if not slots or not any(slots):
            self._local.plan = None
            return False
        s = tuple(int(x) for x in slots)
        self._local.plan = RowPlan(s, s[0] if all(x == s[0] for x in s) else None,
                                   torch.tensor(s, dtype=torch.long, device=self.device))
        return True

    def use_all(self, slot: int) -> None:
        """Every row of the next calls uses `slot`, whatever their number (a classification batch)."""
        self._local.plan = RowPlan((slot,), slot, None) if slot else None

    @property
    def plan(self) -> RowPlan | None:
        return getattr(self._local, "plan", None)


@dataclass(frozen=True)
class LayerAdapter:
    """One adapter's matrices for one layer: A (r, in), B (out, r), y += (x A^T) B^T * scale."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass(frozen=True)
class _Bank:
    own: tuple[LayerAdapter | None, ...]  # per slot (slot 0 and free slots: None)
    at: torch.Tensor  # (S, in, r_max): A^T per slot, zero-padded
    bt: torch.Tensor  # (S, r_max, out): B^T * 1 per slot, zero-padded
    scale: torch.Tensor  # (S,)


class MultiLoraLinear(nn.Module):
    """base(x) plus, per row, the adapter of that row's slot; rows without an adapter get base(x) exactly."""

    def __init__(self, base: nn.Module, rows: AdapterRows, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.rows, self.dtype = rows, dtype
        self.bank: _Bank | None = None
        # the last decode rows' gathered operands (bank, slots, A^T (B, in, r), B^T * scale (B, r, out)): rows
        # change only when one joins or leaves, so most steps reuse them (one tuple, replaced whole)
        self._gathered: tuple | None = None

    @property
    def weight(self):  # code that reads module.weight (dtype, device) keeps working
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        d = self.delta(x, self.rows.plan)
        return y if d is None else y + d

    def delta(self, x: torch.Tensor, plan: RowPlan | None) -> torch.Tensor | None:
        """The rows' adapter products (..., out), or None when no row of this call has one here."""
        bank = self.bank
        if plan is None or bank is None:
            return None
        idx = plan.index
        step = idx is not None and x.dim() == 3 and x.shape[1] == 1 and x.shape[0] == idx.numel()
        if plan.uniform is not None and not step:
            # one adapter for every row of a prompt (or a classification batch): LoraLinear's two products. Decode
            # steps (one token per row) take the per-row products below even then: each row's numbers are then
            # the same whatever the other rows are (batch invariance; bmm runs each row's product on its own)
            k = plan.uniform
            la = bank.own[k] if k < len(bank.own) else None
            if la is None:
                return None
            a = F.linear(x, la.a.to(x.dtype))  # (..., r): the two products LoraLinear runs
            return F.linear(a, la.b.to(x.dtype)) * la.scale
        n = x.shape[0]
        if idx.numel() != n:  # (every bank has a row per slot loaded so far: set_slot)
            raise GenerationError(f"multi-LoRA: {idx.numel()} row slots set for a call of {n} rows")
        g = self._gathered
        if g is None or g[0] is not bank or g[1] != plan.slots or g[2].dtype != x.dtype:
            at = bank.at.index_select(0, idx).to(x.dtype)  # (B, in, r)
            bt = (bank.bt.index_select(0, idx) * bank.scale.index_select(0, idx)[:, None, None]).to(x.dtype)
            g = self._gathered = (bank, plan.slots, at, bt)  # bt: (B, r, out), each row's scale folded in
        xa = x.reshape(n, -1, self.in_features)  # (B, T, in)
        d = torch.bmm(torch.bmm(xa, g[2]), g[3])  # (B, T, out)
        return d.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        n = 0 if self.bank is None else sum(a is not None for a in self.bank.own)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={n}"


class MultiLoraFused(nn.Module):
    """A fused base projection (q|k|v or gate|up, one kernel call) serving MultiLoraLinear-wrapped parts: the base
    columns come from the fused call, each wrapped part's adapter product is added to its own columns."""

    def __init__(self, fused: nn.Module, parts: tuple[nn.Module, ...]) -> None:
        super().__init__()
        self.fused = fused
        self.__dict__["parts"] = tuple(parts)  # not submodules: they live (and are saved) at their own paths
        self.in_features = fused.in_features
        self.out_features = fused.out_features

    def serves(self, *parts: nn.Module) -> bool:
        return len(parts) == len(self.parts) and all(a is b for a, b in zip(parts, self.parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused(x)  # (..., sum of the parts' out)
        off = 0
        for p in self.parts:
            n = p.out_features
            if isinstance(p, MultiLoraLinear):
                d = p.delta(x, p.rows.plan)
                if d is not None:
                    y[..., off: off + n] += d
            off += n
        return y


def _candidates(backbone: nn.Module) -> dict[str, nn.Module]:
    """Block linears an adapter may target (float or quantized): backbone-relative name -> module."""
    return {name: m for name, m in backbone.named_modules()
            if name.startswith("blocks.") and name.rsplit(".", 1)[-1] in TARGETS
            and hasattr(m, "in_features") and hasattr(m, "out_features") and not isinstance(m, MultiLoraFused)}


def multi_lora_layers(backbone: nn.Module) -> dict[str, MultiLoraLinear]:
    return {n: m for n, m in _candidates(backbone).items() if isinstance(m, MultiLoraLinear)}


def install_multi_lora(backbone: nn.Module, names: list[str] | set[str], rows: AdapterRows,
                       dtype: torch.dtype = torch.float32) -> dict[str, MultiLoraLinear]:
    """Wrap these backbone-relative layers (those not wrapped yet) and re-point fused projections at the
    wrappers; returns every wrapped layer. A layer that already holds a trainable LoRA is refused."""
    cands = _candidates(backbone)
    for name in sorted(names):
        m = cands.get(name)
        if m is None:
            raise ConfigError(f"multi-LoRA: the model has no adapter-capable layer {name!r}")
        if isinstance(m, MultiLoraLinear):
            continue
        if hasattr(m, "lora_A"):
            raise ConfigError(f"multi-LoRA: layer {name!r} already has a LoRA adapter (merge it first)")
        parent, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent), child, MultiLoraLinear(m, rows, dtype))
    for mod in backbone.modules():  # fused int4 projections: serve the wrappers (else they turn themselves off)
        for attr, names_ in (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))):
            fused = getattr(mod, attr, None)
            if fused is None or not all(hasattr(mod, a) for a in names_):
                continue
            parts = tuple(getattr(mod, a) for a in names_)
            bases = tuple(p.base if isinstance(p, MultiLoraLinear) else p for p in parts)
            inner = fused.fused if isinstance(fused, MultiLoraFused) else fused
            if hasattr(inner, "serves") and inner.serves(*bases) and any(isinstance(p, MultiLoraLinear) for p in parts):
                setattr(mod, attr, MultiLoraFused(inner, parts))
    return multi_lora_layers(backbone)


def _rebuild(layer: MultiLoraLinear, own: list[LayerAdapter | None]) -> None:
    if not any(a is not None for a in own):
        layer.bank = None
        return
    r = max(a.a.shape[0] for a in own if a is not None)
    dev = next(a.a.device for a in own if a is not None)
    S = len(own)
    at = torch.zeros(S, layer.in_features, r, dtype=layer.dtype, device=dev)  # (S, in, r_max)
    bt = torch.zeros(S, r, layer.out_features, dtype=layer.dtype, device=dev)  # (S, r_max, out)
    scale = torch.zeros(S, dtype=layer.dtype, device=dev)
    for k, a in enumerate(own):
        if a is not None:
            rk = a.a.shape[0]
            at[k, :, :rk] = a.a.t()
            bt[k, :rk] = a.b.t()
            scale[k] = a.scale
    layer.bank = _Bank(tuple(own), at, bt, scale)  # one assignment: a running call sees the old or the new bank


def set_slot(layers: dict[str, MultiLoraLinear], slot: int, tensors: dict[str, LayerAdapter]) -> None:
    """Put one adapter's per-layer matrices (backbone-relative names) into `slot` of every wrapped layer."""
    if slot < 1:
        raise ConfigError(f"multi-LoRA: slot {slot} is reserved for the base")
    for name, layer in layers.items():
        own = list(layer.bank.own) if layer.bank is not None else [None]
        own += [None] * (slot + 1 - len(own))
        t = tensors.get(name)
        if t is not None:
            if tuple(t.a.shape)[1] != layer.in_features or tuple(t.b.shape)[0] != layer.out_features:
                raise ConfigError(f"multi-LoRA: adapter for {name!r} is ({t.b.shape[0]}x{t.a.shape[1]}), the layer "
                                  f"is ({layer.out_features}x{layer.in_features})")
            t = LayerAdapter(t.a.to(layer.dtype).contiguous(), t.b.to(layer.dtype).contiguous(), float(t.scale))
        own[slot] = t
        _rebuild(layer, own)


def clear_slot(layers: dict[str, MultiLoraLinear], slot: int) -> None:
    """Forget `slot` in every layer (its rows must all be gone)."""
    for layer in layers.values():
        if layer.bank is not None and slot < len(layer.bank.own):
            own = list(layer.bank.own)
            own[slot] = None
            _rebuild(layer, own)
