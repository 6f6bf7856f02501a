"""Block and Transformer: the backbone shared by every family and task.

The norm placement of a block (pre, post, sandwich or output) and every other variant come from ModelConfig, so
one class serves every family.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.model.cache import KVCache, StaticKV
from lmforge.model.invariant import linear_rows
from lmforge.model.layers import Attention, Embeddings, Rotary, make_mlp, make_norm
from lmforge.model.moe import MoE


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask (True = may attend) as the 0 / -inf one SDPA would build from it."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def set_dropout(model: nn.Module, p: float, attention: bool = True) -> None:
    """Change the dropout of an already built model (loaded checkpoints come with 0.0).

    attention=False leaves attention-probability dropout at 0: on CPU, SDPA with dropout_p > 0 leaves the
    flash kernel for the math path (measured ~4.5x slower forward + backward at QA shapes).
    """
    for m in model.modules():
        if isinstance(m, Transformer):
            m.cfg.dropout = p  # saved configs say what the run trained with
        elif isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, Attention):
            m.dropout = p if attention else 0.0


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of a (B, S) mask is its real tokens then its pads (no 1 after a 0). On an accelerator
    this reads one bool back (a sync per forward), a small price for SDPA's causal kernel there."""
    m = attention_mask.bool()
    return not bool((m[:, 1:] & ~m[:, :-1]).any())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.placement = cfg.norm_placement  # pre | post | sandwich | output
        self.attn = Attention(cfg, layer)
        self.mlp = MoE(cfg) if cfg.is_moe(layer) else make_mlp(cfg)
        # pre: before attention / the MLP; post: after their residual add; output: on their output, before the add
        self.norm1 = make_norm(cfg) if layer or cfg.first_attn_norm else nn.Identity()  # modernbert: none in layer 0
        self.norm2 = make_norm(cfg)
        if self.placement == "sandwich":
            self.post_norm1 = make_norm(cfg)  # on the attention output, before the residual
            self.post_norm2 = make_norm(cfg)  # on the MLP output, before the residual
        self.drop = nn.Dropout(cfg.dropout)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # the module call costs ~3 us even when it does nothing: 60 of them per decoded token
        return self.drop(x) if self.training and self.drop.p else x

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None, cache: KVCache | StaticKV | None
                ) -> torch.Tensor:
        # x: (B, T, D)
        if self.placement == "pre":
            x = x + self._drop(self.attn(self.norm1(x), rope, mask, cache))
            return x + self._drop(self.mlp(self.norm2(x)))
        if self.placement == "sandwich":
            x = x + self._drop(self.post_norm1(self.attn(self.norm1(x), rope, mask, cache)))
            return x + self._drop(self.post_norm2(self.mlp(self.norm2(x))))
        if self.placement == "output":
            x = x + self._drop(self.norm1(self.attn(x, rope, mask, cache)))
            return x + self._drop(self.norm2(self.mlp(x)))
        x = self.norm1(x + self._drop(self.attn(x, rope, mask, cache)))
        return self.norm2(x + self._drop(self.mlp(x)))


class Transformer(nn.Module):
    """Embeddings -> blocks -> final norm; `forward` returns hidden states, `logits` adds the LM head.

    `quant_head` is the one hook for another LM head implementation: None (the default) means the float
    matmul with `lm_head` or the tied token embeddings; `set_lm_head(module)` puts a module there (lmforge.quant
    stores its quantized head so), and `lm_logits` calls it instead. Its tensors save as `quant_head.*`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg) if cfg.final_norm else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        self.quant_head: nn.Module | None = None
        self.row_block, self.row_block_max = 0, 0  # > 0: a float LM head in fixed row blocks (model.invariant)
        self.pooler = nn.Linear(d, d, bias=cfg.pooler_bias) if cfg.pooler else None
        self.pooler_norm = make_norm(cfg) if cfg.pooler and cfg.pooler_norm else None  # modernbert's head.norm
        self.init_buffers()
        if not self.embed.tok.weight.is_meta:  # a meta model is a shell for loaded weights; and normal_ on meta
            self.apply(self._init_weights)  # imports torch._dynamo (~3 s, ~70 MB) for nothing

    def init_buffers(self, device=None) -> None:
        """(Re)compute the non-persistent buffers: needed after building on the meta device."""
        cfg = self.cfg
        self.embed.init_buffers(device)
        if cfg.position == "rotary":
            assert cfg.head_dim is not None
            with torch.device(device or "cpu"):
                self.rope = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rotary_fraction)
                self.rope_local = (
                    Rotary(cfg.head_dim, cfg.rope_local_theta, None, cfg.rotary_fraction)
                    if cfg.rope_local_theta is not None else None
                )

    def set_lm_head(self, module: nn.Module | None) -> None:
        """Compute logits with `module` ((..., D) -> (..., V)) instead of the float LM head; None restores it."""
        self.quant_head = module

    # ---- init (for training from scratch) ------------------------------------------------------
    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.fc2.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids (B, T); attention_mask (B, S) over cached + new tokens (1 = real); -> (B, T, D).

        Position ids default to the count of real tokens before each one, so left-padded rows get the
        same positions as unpadded ones.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past: past + T]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        if past + T > cfg.context_length:  # a static check: no device sync in the decode loop
            raise ConfigError(f"sequence of {past + T} tokens exceeds the model's context_length "
                              f"{cfg.context_length}")
        x = self.embed(input_ids, position_ids, token_type_ids)  # (B, T, D)

        rope = rope_local = None
        if cfg.position == "rotary":
            rope = self.rope.cos_sin(position_ids, x.dtype)
            rope_local = self.rope_local.cos_sin(position_ids, x.dtype) if self.rope_local is not None else rope
        mask, mask_local = self._masks(attention_mask, B, T, past, x.device)
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(self.blocks):
            sliding = cfg.is_sliding(i)
            x = block(x, rope_local if sliding else rope, mask_local if sliding else mask, cache)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.length += T
        if self.norm is not None:
            x = self.norm(x)
            if hidden is not None:
                hidden[-1] = x  # HF convention: the last hidden state is after the final norm
        return (x, hidden) if output_hidden_states else x

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                    cache: StaticKV) -> torch.Tensor:
        """One decode step with static shapes: tokens (B, 1), their positions (B, 1), valid (B, L) bool over the
        cache's L columns (True = a real token, the one written at `cache.col` included) -> float32 logits (B, V).

        The math of `forward` on one new token with a cache, then `lm_logits`; only the attention covers all L
        columns with a mask instead of the first `length` (exact: masked scores are -inf, weight 0), and no Python
        value depends on the step, so one trace serves every step of every generation of the same (B, L).
        Causal models only (the caller checks `cfg.causal`); the context-length check is the caller's.
        """
        return self.lm_logits(self.decode_hidden(tokens, positions, valid, cache)).float()  # (B, V)

    def decode_hidden(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                      cache: StaticKV) -> torch.Tensor:
        """`decode_step` up to the final norm: (B, D). The part generate compiles; the LM head (one matmul,
        nothing to fuse) runs outside, so a head dynamo cannot trace (lmforge.quant's int8 kernel checks the
        operand's address) does not break the graph."""
        cfg = self.cfg
        x = self.embed(tokens, positions)  # (B, 1, D)
        rope = rope_local = None
        if cfg.position == "rotary":
            rope = self.rope.cos_sin(positions, x.dtype)
            rope_local = self.rope_local.cos_sin(positions, x.dtype) if self.rope_local is not None else rope
        mask = valid[:, None, None, :]  # (B, 1, 1, L)
        mask_local = mask
        if cfg.sliding_window and cfg.layer_types is not None and "sliding" in cfg.layer_types:
            k_idx = torch.arange(valid.shape[1], device=valid.device)  # (L,)
            mask_local = mask & (cache.col - k_idx < cfg.sliding_window)  # (B, 1, 1, L), as _masks' `local`
        if cfg.attn_softcap is None:  # SDPA turns a bool mask into a 0/-inf one in every layer: do it once
            same = mask_local is mask
            mask = additive_mask(mask, x.dtype)
            mask_local = mask if same else additive_mask(mask_local, x.dtype)
        for i, block in enumerate(self.blocks):
            sliding = cfg.is_sliding(i)
            x = block(x, rope_local if sliding else rope, mask_local if sliding else mask, cache)
        if self.norm is not None:
            x = self.norm(x)
        return x[:, -1]  # (B, D)

    def _masks(self, attention_mask: torch.Tensor | None, B: int, T: int, past: int, device):
        """Boolean (B, 1, T, S) masks, True = may attend; None when SDPA's own causal path is exact."""
        cfg = self.cfg
        S = past + T
        has_sliding = bool(cfg.sliding_window) and cfg.layer_types is not None and "sliding" in cfg.layer_types
        if attention_mask is None and (past == 0 or T == 1) and not (has_sliding and S > cfg.sliding_window):
            return None, None  # SDPA's is_causal (prefill) or no mask at all (one new token) is exact
        if (attention_mask is not None and cfg.causal and past == 0 and not (has_sliding and S > cfg.sliding_window)
                and right_padded(attention_mask[:, :S])):
            # training and scoring batches: a real token never sees a pad, since pads come after it. is_causal
            # lets SDPA skip the blocks above the diagonal instead of reading a (B, 1, T, T) mask
            return None, None
        q_idx = torch.arange(past, S, device=device)[:, None]  # (T, 1)
        k_idx = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = (k_idx <= q_idx) if cfg.causal else torch.ones(T, S, dtype=torch.bool, device=device)
        allowed = allowed[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :S].bool()  # (B, 1, T, S)
        local = None
        if has_sliding:
            dist = q_idx - k_idx if cfg.causal else (q_idx - k_idx).abs()  # (T, S); bidirectional: both sides
            local = allowed & (dist < cfg.sliding_window)[None, None]
            local = local | ~local.any(-1, keepdim=True)
        # a padded query row that may see nothing would give NaN: let it see everything (its output is unused)
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        return allowed, local

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states -> (..., V) logits, tied or not, soft-capped if the config says so."""
        if self.quant_head is not None:  # set_lm_head's module (lmforge.quant's quantized head)
            logits = self.quant_head(h)
        else:
            w = self.embed.tok.weight if self.lm_head is None else self.lm_head.weight
            if self.row_block and h.numel() // h.shape[-1] <= self.row_block_max:  # batch-invariant decode rows
                logits = linear_rows(h, w, None, self.row_block)
            else:
                logits = F.linear(h, w)
        if self.cfg.final_softcap is not None:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        return self.lm_logits(self(input_ids, attention_mask, **kw))  # (B, T, V)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
