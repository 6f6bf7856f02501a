"""The pieces of a Transformer: norms, positional encodings, embeddings, attention (SDPA, GQA, KV cache), MLPs.

Each class reads the ModelConfig fields that select its variant; parameter names are chosen so that the
Hugging Face name maps in checkpoints/hf.py are one line per tensor.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import cpu_kernels
from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.model.cache import KVCache, StaticKV


def one_pass_ok(x: torch.Tensor) -> bool:
    """Whether lmforge's CPU ops (rms_norm, decode_attn, silu_mul) may replace a few torch ops here: float32 on
    CPU, grad mode off (inference: the ops have no backward), outside torch.compile (which fuses the torch ops
    itself), and the kernels in use on this machine (lmforge.cpu_kernels)."""
    return (x.device.type == "cpu" and x.dtype is torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and cpu_kernels.available())


# ---- norms ---------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm computed in float32. `offset=1` is Gemma's convention (weight stored as w-1)."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0.0 else torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offset and x.dtype is torch.float32 and self.weight.dtype is torch.float32:
            if one_pass_ok(x):  # one pass, ~5x faster for one token
                return torch.ops.lmforge.rms_norm(x.contiguous(), self.weight, self.eps)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one op, bit for bit the lines below
        # F.rms_norm (one fused op) computes x * rsqrt(mean(x^2) + eps), as HF does, in float32 here
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.offset:  # gemma multiplies in float32, then casts
            return (xf * (self.offset + self.weight.float())).type_as(x)
        return self.weight * xf.type_as(x)  # llama casts, then multiplies


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)
    return RMSNorm(dim, cfg.norm_eps, cfg.norm_offset)  # ModelConfig allows only these two


_ACTIVATIONS = MappingProxyType({  # read-only: the decode path holds no mutable module state
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
})


def activation(name: str):
    return _ACTIVATIONS[name]  # the names of ModelConfig's Activation Literal, checked there


# ---- positions -----------------------------------------------------------------------------------
def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention is all you need"; (n_pos, dim)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]  # (P, 1)
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim/2,)
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


def rope_inv_freq(dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with the linear and llama3 scalings of HF configs."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (dim/2,)
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor, lo, hi = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(is_mid, mid, scaled)
    if kind == "longrope":
        return inv / torch.tensor(scaling["short_factor"], dtype=torch.float32)  # the long factors: Rotary
    raise ConfigError(f"config field 'rope_scaling': unsupported rope_type {kind!r} (linear | llama3 | longrope)")


def longrope(dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, int, float]:
    """Phi-3's longrope: (the inverse frequencies past the original context, that context, the cos/sin scale)."""
    orig = scaling.get("original_max_position_embeddings")
    if not isinstance(orig, int) or orig < 1:
        raise ConfigError("config field 'rope_scaling': longrope needs original_max_position_embeddings")
    for key in ("short_factor", "long_factor"):
        if not isinstance(scaling.get(key), list) or len(scaling[key]) != dim // 2:
            raise ConfigError(f"config field 'rope_scaling': longrope's {key} must be a list of {dim // 2} numbers")
    factor = scaling.get("factor") or scaling.get("max_position_embeddings", orig) / orig
    scale = scaling.get("attention_factor") or (
        1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig)))
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (dim/2,)
    return inv / torch.tensor(scaling["long_factor"], dtype=torch.float32), orig, float(scale)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half layout, as in HF checkpoints) on the first `rot_dim` dims.
    longrope (Phi-3) switches to its long frequencies for a whole forward once its positions pass the original
    context, as transformers does, and scales cos and sin."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None, fraction: float = 1.0) -> None:
        super().__init__()
        self.rot_dim = int(head_dim * fraction)
        self.register_buffer("inv_freq", rope_inv_freq(self.rot_dim, theta, scaling), persistent=False)
        self.switch_at, self.scale = None, 1.0  # longrope: positions from which the long frequencies apply
        if scaling and scaling.get("rope_type", scaling.get("type")) == "longrope":
            long, self.switch_at, self.scale = longrope(self.rot_dim, theta, scaling)
            self.register_buffer("long_inv_freq", long, persistent=False)

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (B, T) -> cos, signed sin: (B, 1, T, rot_dim), computed in float32 like HF. The sin's
        first half is negated, so that apply_rotary's rotate-half is a roll (the sign flip is exact)."""
        inv = self.inv_freq
        if self.switch_at is not None and int(position_ids.max()) + 1 > self.switch_at:  # one sync: longrope only
            inv = self.long_inv_freq
        freqs = position_ids[:, :, None].float() * inv[None, None, :].float()  # (B, T, rot/2)
        pad = -self.rot_dim % 16  # each row a multiple of 16 values: cos/sin take their vectorized path for every
        # value (a scalar tail would round some positions differently depending on how many rows the call has)
        emb = torch.cat((freqs, freqs, freqs.new_zeros(*freqs.shape[:2], pad)) if pad else (freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()  # (B, T, rot + pad)
        if pad:
            cos, sin = cos[..., : self.rot_dim].contiguous(), sin[..., : self.rot_dim].contiguous()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        sin[..., : self.rot_dim // 2].neg_()
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos, signed sin (Rotary.cos_sin): (B, 1, T, rot). HF's rotate_half(x) = cat(-x2, x1)
    # = roll(x, rot/2) * sign, and the sign is in `sin`: 4 ops instead of 6 (chunk, neg, cat) per call
    rot = cos.shape[-1]
    xr, xp = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    out = xr * cos + xr.roll(rot // 2, -1) * sin
    return out if xp is None else torch.cat((out, xp), dim=-1)


# ---- embeddings ----------------------------------------------------------------------------------
def _table(n: int, dim: int) -> nn.Embedding:
    """An nn.Embedding left uninitialised: Transformer._init_weights fills every table, and a model built on the
    meta device (to receive loaded weights) must not run normal_, which there imports torch._dynamo (~3 s and
    ~70 MB of resident memory for nothing)."""
    return nn.Embedding(n, dim, _weight=torch.empty(n, dim))


class Embeddings(nn.Module):
    """Token ids -> vectors: token embedding (times `embed_scale`), plus learned or sinusoidal positions and
    token types where the family has them, then bert's LayerNorm and dropout. Rotary positions are applied
    inside attention instead. Submodule names (tok, pos, seg, norm) are the `embed.*` tensor names."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = _table(cfg.vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.pos = _table(cfg.context_length + cfg.position_offset, cfg.d_model)
        if cfg.position == "sinusoidal":
            self.register_buffer("sin_table", torch.empty(0), persistent=False)
        if cfg.type_vocab_size:
            self.seg = _table(cfg.type_vocab_size, cfg.d_model)
        if cfg.embed_norm:
            self.norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.init_buffers()

    def init_buffers(self, device=None) -> None:
        """(Re)compute the sinusoidal table (not in the state dict): needed after building on the meta device."""
        if self.cfg.position == "sinusoidal":
            self.sin_table = sinusoidal_table(self.cfg.context_length, self.cfg.d_model).to(device)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, position_ids, token_type_ids: (B, T) -> (B, T, D)
        cfg = self.cfg
        x = self.tok(input_ids)  # (B, T, D)
        if cfg.embed_scale is not None:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)  # rounded to the weights' dtype, as HF does
        if cfg.position == "learned":
            x = x + self.pos(position_ids + cfg.position_offset if cfg.position_offset else position_ids)
        elif cfg.position == "sinusoidal":
            x = x + self.sin_table[position_ids].to(x.dtype)
        if cfg.type_vocab_size:
            x = x + self.seg(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        if cfg.embed_norm:
            x = self.norm(x)
        return self.drop(x)


# ---- attention -----------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        assert cfg.head_dim is not None and cfg.n_kv_heads is not None
        self.layer, self.n_heads, self.n_kv, self.hd = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        out_bias = cfg.attn_bias if cfg.attn_out_bias is None else cfg.attn_out_bias
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=out_bias)
        # qk_norm_scope "head": over each head's dims, on (B, H, T, hd); "all": over the whole projection (B, T, H*hd)
        self.qk_all = cfg.qk_norm and cfg.qk_norm_scope == "all"
        qd, kd = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim) if self.qk_all else (cfg.head_dim,) * 2
        self.q_norm = RMSNorm(qd, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(kd, cfg.norm_eps, cfg.norm_offset) if cfg.qk_norm else None
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_softcap
        self.dropout = cfg.dropout
        self.causal = cfg.causal  # False for bidirectional encoders (bert)
        self.qkv: nn.Module | None = None  # q|k|v as one matmul at decode time (lmforge.quant.fuse_projections)
        self.invariant = False  # one new token per row attends to its row's columns only (model.invariant)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: KVCache | StaticKV | None) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, D)
        H, KV = self.n_heads, self.n_kv
        if isinstance(cache, StaticKV) and self._one_pass(x, rope, mask, cache):
            return self._decode_one_pass(x, rope, mask, cache)
        if T > 1 and isinstance(cache, KVCache) and getattr(cache, "verify_rows", None):
            return self._verify_rows(x, rope, cache)
        qkv = self.qkv
        if self.qk_all:  # norms over the whole projections, before the split into heads
            q = self.q_norm(self.q(x)).view(B, T, H, self.hd).transpose(1, 2)  # (B, H, T, hd)
            k = self.k_norm(self.k(x)).view(B, T, KV, self.hd).transpose(1, 2)  # (B, KV, T, hd)
            v = self.v(x).view(B, T, KV, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        elif qkv is not None and qkv.serves(self.q, self.k, self.v):
            y = qkv(x).view(B, T, H + 2 * KV, self.hd).transpose(1, 2)  # (B, H+2KV, T, hd)
            if self.q_norm is None and rope is not None:  # rotate q and k in one go
                qk = apply_rotary(y[:, : H + KV], *rope)
                q, k, v = qk[:, :H], qk[:, H:], y[:, H + KV:]
                rope = None
            else:
                q, k, v = y.split((H, KV, KV), dim=1)
        else:
            q = self.q(x).view(B, T, H, self.hd).transpose(1, 2)  # (B, H, T, hd)
            k = self.k(x).view(B, T, KV, self.hd).transpose(1, 2)  # (B, KV, T, hd)
            v = self.v(x).view(B, T, KV, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        if self.q_norm is not None and not self.qk_all:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, KV, S, hd)
        if self.invariant and T == 1 and cache is not None and not (torch.jit.is_tracing()
                                                                   or torch.compiler.is_compiling()):
            y = self._rows_attention(q, k, v, mask)  # (B, H, 1, hd); reads Python ints: never captured
        elif self.softcap is not None:
            y = self._softcapped(q, k, v, mask)
        else:
            is_causal = mask is None and self.causal and T > 1  # else the model passed a mask
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal, scale=self.scale, enable_gqa=self.n_kv != self.n_heads,
            )  # (B, H, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))

    def _rows_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
        """One new token per row, each row's attention over exactly its own allowed columns: q (B, H, 1, hd),
        k, v (B, KV, S, hd), mask (B, 1, 1, S) bool or additive, or None (every column) -> (B, H, 1, hd). The
        call for a row has the same shapes and values whatever the other rows are (padding, cache width)."""
        allowed = None
        if mask is not None:
            allowed = mask[:, 0, -1] if mask.dtype is torch.bool else mask[:, 0, -1] == 0  # (B or 1, S)
            allowed = allowed.expand(q.shape[0], -1)  # (B, S)
        out = []
        for b in range(q.shape[0]):
            kb, vb = k[b: b + 1], v[b: b + 1]  # (1, KV, S, hd)
            if allowed is not None:
                idx = allowed[b].nonzero()[:, 0]  # (n,)
                first, n = int(idx[0]), idx.numel()
                if int(idx[-1]) - first + 1 == n:  # one contiguous run (left padding): a view
                    kb, vb = kb.narrow(2, first, n), vb.narrow(2, first, n)
                else:
                    kb, vb = kb.index_select(2, idx), vb.index_select(2, idx)
            if self.softcap is not None:
                out.append(self._softcapped(q[b: b + 1], kb, vb, None))
            else:
                out.append(F.scaled_dot_product_attention(q[b: b + 1], kb, vb, scale=self.scale,
                                                          enable_gqa=self.n_kv != self.n_heads))
        return torch.cat(out)

    def _verify_rows(self, x: torch.Tensor, rope, cache: KVCache) -> torch.Tensor:
        """T new tokens of one row (speculative decoding's verification, decoding/speculative.py), each query's
        attention run as the one-token decode step runs it, over the same columns, so that the T verified
        positions give the numbers of T steps bit for bit; the projections run once over the T rows (lmforge's
        int4/int8 kernels are row-invariant). cache.verify_rows: "static" (the traced / compiled step: decode_attn
        where it runs, all T rows in one call, else the StaticKV step's attention over every column with an
        additive mask, per row) or "eager" (the eager step: per row, SDPA over the first length + 1 columns)."""
        B, T, _ = x.shape  # (1, T, D)
        H, hd, layer = self.n_heads, self.hd, self.layer
        past, static = cache.length, cache.verify_rows == "static"
        ck, cv = cache.k[layer], cache.v[layer]  # (1, KV, L, hd)
        L, dev = ck.shape[2], x.device
        if static and self.one_pass_capable(ck.dtype) and one_pass_ok(x):
            cols, mask = cache.verify_inputs(T, x.dtype)  # (T,) the column each row writes, (T, L) what it sees
            q, k, v = self._rows_qkv(x.reshape(T, 1, -1))  # (T, H*hd), (T, KV*hd) x 2
            cos, sin = rope if rope is not None else (None, None)  # (1, 1, T, rot): T rows of rot values
            scale = self.scale if self.scale is not None else hd ** -0.5
            y = torch.ops.lmforge.decode_attn(q, k, v, cos, sin, ck.expand(T, -1, -1, -1), cv.expand(T, -1, -1, -1),
                                              cols, mask, scale)  # (T, H*hd); one cache, T columns written
            return self.o(y.view(B, T, H * hd))
        q, k, v = self._verify_qkv(x, rope)  # (1, H, T, hd), (1, KV, T, hd) x 2
        if static:
            ck.narrow(2, past, T).copy_(k)
            cv.narrow(2, past, T).copy_(v)
        else:
            cache.update(layer, k, v)  # columns past .. past + T - 1; cache.length is the model's to advance
        out = []
        for i in range(T):
            if static:
                allowed = (torch.arange(L, device=dev) <= past + i)[None, None, None, :]  # (1, 1, 1, L)
                mask = allowed if self.softcap is not None else torch.zeros(
                    allowed.shape, dtype=x.dtype, device=dev).masked_fill(~allowed, float("-inf"))
                ki, vi = ck, cv
            else:
                mask, ki, vi = None, ck.narrow(2, 0, past + i + 1), cv.narrow(2, 0, past + i + 1)
            qi = q[:, :, i: i + 1]  # (1, H, 1, hd)
            if self.invariant and not torch.jit.is_tracing():
                out.append(self._rows_attention(qi, ki, vi, mask))
            elif self.softcap is not None:
                out.append(self._softcapped(qi, ki, vi, mask))
            else:
                out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=self.scale,
                                                          enable_gqa=self.n_kv != self.n_heads))
        y = torch.cat(out, 2)  # (1, H, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, H * hd))

    def _verify_qkv(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward's projections, qk-norms and rotary for T rows at once (each an elementwise or per-row op, so
        row i gets the one-token step's numbers): x (1, T, D) -> q (1, H, T, hd), k, v (1, KV, T, hd)."""
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv, self.hd
        qkv = self.qkv
        if self.qk_all:
            q = self.q_norm(self.q(x)).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
            k = self.k_norm(self.k(x)).view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
            v = self.v(x).view(B, T, KV, hd).transpose(1, 2)
        elif qkv is not None and qkv.serves(self.q, self.k, self.v):
            q, k, v = qkv(x).view(B, T, H + 2 * KV, hd).transpose(1, 2).split((H, KV, KV), dim=1)
        else:
            q = self.q(x).view(B, T, H, hd).transpose(1, 2)
            k = self.k(x).view(B, T, KV, hd).transpose(1, 2)
            v = self.v(x).view(B, T, KV, hd).transpose(1, 2)
        if self.q_norm is not None and not self.qk_all:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def one_pass_capable(self, cache_dtype: torch.dtype) -> bool:
        """Whether a decode step's attention here runs lmforge's decode_attn (`_one_pass`, given a float32 CPU
        step): a traced step may then hold it (the per-row path of `_rows_attention` reads Python ints)."""
        return self.hd % 8 == 0 and self.softcap is None and cache_dtype is torch.float32 and cpu_kernels.available()

    def _one_pass(self, x: torch.Tensor, rope, mask: torch.Tensor | None, cache: StaticKV) -> bool:
        """Whether lmforge's CPU kernels can run this static decode step's attention as one op: one token per
        row, no soft-cap, and `one_pass_ok`."""
        return (x.shape[1] == 1 and mask is not None and mask.dtype is torch.float32 and self.hd % 8 == 0
                and self.softcap is None and cache.k[self.layer].dtype is torch.float32 and one_pass_ok(x))

    def _rows_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per row, x (B, 1, D) -> q (B, H*hd), k, v (B, KV*hd): the projections and the qk-norms
        (per head or over the whole projection, the same module calls as forward's, so the same numbers),
        before rotary (decode_attn applies it)."""
        B, H, KV, hd = x.shape[0], self.n_heads, self.n_kv, self.hd
        qkv = self.qkv
        if qkv is not None and qkv.serves(self.q, self.k, self.v):
            q, k, v = qkv(x).view(B, (H + 2 * KV) * hd).split((H * hd, KV * hd, KV * hd), dim=1)
        else:
            q, k, v = self.q(x).reshape(B, H * hd), self.k(x).reshape(B, KV * hd), self.v(x).reshape(B, KV * hd)
        if self.qk_all:
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.q_norm is not None:  # over each head's hd values
            q = self.q_norm(q.reshape(B, H, hd)).view(B, H * hd)
            k = self.k_norm(k.reshape(B, KV, hd)).view(B, KV * hd)
        return q, k, v

    def _decode_one_pass(self, x: torch.Tensor, rope, mask: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """torch.ops.lmforge.decode_attn: rotary on q and k, k and v written into the cache at `cache.col`,
        attention over the columns `mask` allows (the rest skipped); ~20 ops per layer become one."""
        B, H, hd = x.shape[0], self.n_heads, self.hd
        q, k, v = self._rows_qkv(x)  # (B, H*hd), (B, KV*hd) x 2
        cos, sin = rope if rope is not None else (None, None)
        scale = self.scale if self.scale is not None else hd ** -0.5
        y = torch.ops.lmforge.decode_attn(q, k, v, cos, sin, cache.k[self.layer], cache.v[self.layer], cache.col,
                                          mask, scale)  # (B, H*hd)
        return self.o(y.view(B, 1, H * hd))

    def _softcapped(self, q, k, v, mask):
        """Explicit attention for tanh logit soft-capping (SDPA cannot express it)."""
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scale = self.scale if self.scale is not None else self.hd ** -0.5
        s = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
        s = torch.tanh(s / self.softcap) * self.softcap
        T, S = s.shape[-2:]
        if mask is None and self.causal and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=s.device).tril(S - T)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return s.softmax(-1).to(v.dtype) @ v


# ---- MLP -----------------------------------------------------------------------------------------
class MLP(nn.Module):
    """fc1 -> act -> fc2 (gpt2, bert)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.act = activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (llama) or GeGLU (gemma)."""

    def __init__(self, cfg: ModelConfig, d_ff: int | None = None) -> None:
        super().__init__()
        d_ff = d_ff or cfg.d_ff  # an expert of a mixture has its own width
        self.gate = nn.Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.act = activation(cfg.activation)
        self.gate_up: nn.Module | None = None  # gate|up as one matmul at decode time (quant.fuse_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up
        if gu is not None and gu.serves(self.gate, self.up):
            h = gu(x)  # (..., 2F)
            if self.act is F.silu and one_pass_ok(h) and h.is_contiguous():
                return self.down(torch.ops.lmforge.silu_mul(h))  # chunk, silu, mul in one pass
            g, u = h.chunk(2, dim=-1)  # (..., F) each
            return self.down(self.act(g) * u)
        return self.down(self.act(self.gate(x)) * self.up(x))


def make_mlp(cfg: ModelConfig) -> nn.Module:
    return MLP(cfg) if cfg.mlp == "gelu" else GatedMLP(cfg)  # gated: swiglu | geglu (ModelConfig checks)
