"""Task heads on top of the backbone: the causal-LM loss, pooling, sequence classification, extractive-QA
spans, embeddings.

The LM head's matmul lives in Transformer.lm_logits (it may be tied to the token embeddings); its one loss
(`lm_head_loss`, fused and chunked for float32) is here, used by pretraining, fine-tuning and perplexity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError, TokenizerError
from lmforge.model.layers import activation, make_norm
from lmforge.model.transformer import Transformer

POOLINGS = ("last", "cls", "mean")
IGNORE = -100  # label of a position that has no target (prompt, padding), as in transformers


# ---- causal LM: the head and its loss -------------------------------------------------------------------
class _HeadCrossEntropy(torch.autograd.Function):
    """LM head + next-token cross-entropy in one op, its gradients computed in the forward pass.

    Why (measured on a 2-core AVX2 CPU, GPT-2 small, 1024 tokens): `F.linear(h, W)` into a fresh
    (tokens x 50257) float32 tensor runs at ~36 GFLOP/s, while the same product written vocab-major,
    W @ h^T into a reused (V x tokens) buffer, runs at ~55 GFLOP/s; and the standard loss allocates three
    more logits-sized tensors per step (log-softmax, its gradient, the NLL gradient), each a fresh mmap
    with page faults. Here the logits of a chunk of tokens go into one reused workspace, become exp(logit -
    max) in place, and the two gradient matmuls run right away on it (softmax's 1/sum and the -onehot are
    applied to the small operands); backward only scales the results. Labels must all be real targets:
    `lm_head_loss` drops IGNORE rows before calling it.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, workspace: dict, mean: bool,
                need_grad: bool) -> torch.Tensor:
        # h: (N, D); w: (V, D); labels: (N,) -> scalar loss (mean or sum over the N tokens)
        N, V = h.shape[0], w.shape[0]
        chunk = max(1, min(N, WORKSPACE_ELEMS // V))
        flat = workspace.get("buf")
        if flat is None or flat.numel() < V * chunk or flat.dtype != h.dtype or flat.device != h.device:
            flat = workspace["buf"] = torch.empty(V * chunk, dtype=h.dtype, device=h.device)
        want_h = need_grad and ctx.needs_input_grad[0]
        want_w = need_grad and ctx.needs_input_grad[1]
        gh = torch.empty_like(h) if want_h else None
        gw: torch.Tensor | None = None
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        for s in range(0, N, chunk):
            hc, yc = h[s: s + chunk], labels[s: s + chunk]
            c = hc.shape[0]
            buf = flat[: V * c].view(V, c)
            torch.mm(w, hc.t(), out=buf)  # logits, vocab-major: (V, c)
            picked = buf.gather(0, yc[None]).squeeze(0)  # (c,) logit of each target
            mx = buf.amax(0)  # (c,)
            buf.sub_(mx).exp_()
            se = buf.sum(0)  # (c,)
            total += (se.log() + mx - picked).sum(dtype=torch.float64)
            # d loss / d logits = softmax - onehot = buf / se - onehot: the 1/se and the onehot are applied to the
            # (small) matmul operands and outputs, not to the (V, c) buffer
            inv = se.reciprocal()[:, None]  # (c, 1)
            if want_h:
                ghc = gh[s: s + c]
                torch.mm(buf.t(), w, out=ghc)  # (c, D)
                ghc.mul_(inv).sub_(w[yc])
            if want_w:
                hs = hc * inv  # (c, D)
                gw = torch.mm(buf, hs) if gw is None else gw.addmm_(buf, hs)  # (V, D)
                gw.index_add_(0, yc, hc, alpha=-1.0)
        scale = 1.0 / N if mean else 1.0
        ctx.grads, ctx.scale = (gh, gw), scale
        return (total * scale).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gh, gw = ctx.grads
        ctx.grads = (None, None)  # hand over the only reference: autograd may then accumulate in place
        s = grad_out * ctx.scale
        if gh is not None:
            gh.mul_(s)
        if gw is not None:
            gw.mul_(s)
        return gh, gw, None, None, None, None


WORKSPACE_ELEMS = 64 * 2**20  # logits workspace of the fused loss: 256 MiB of float32 at most (then chunks)


def lm_head_loss(backbone: Transformer, h: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                 fused: bool = True, workspace: dict | None = None) -> torch.Tensor:
    """Cross-entropy of the LM head's logits at hidden states h (..., D) against labels (...), the token each
    position must predict; IGNORE positions count for nothing and the head never runs on them (prompt and
    padding tokens skip the large vocabulary matmul). Float32 without soft-capping or a set_lm_head module
    takes the fused op (same value and gradients as logits -> F.cross_entropy); the rest the plain path."""
    h, y = h.reshape(-1, h.shape[-1]), labels.reshape(-1).to(h.device)  # (N, D), (N,)
    keep = y != IGNORE
    if not bool(keep.all()):
        h, y = h[keep], y[keep]
    if y.numel() == 0:  # no target in the batch: a zero that still reaches every weight in backward
        return h.sum() * 0.0
    if backbone.quant_head is not None:  # (an int8 embedding's .weight would be a whole float copy, unused)
        return F.cross_entropy(backbone.lm_logits(h).float(), y, reduction=reduction)  # logits: (N, V)
    w = backbone.embed.tok.weight if backbone.lm_head is None else backbone.lm_head.weight  # (V, D)
    if (fused and h.dtype == w.dtype == torch.float32 and backbone.cfg.final_softcap is None
            and reduction in ("mean", "sum")
            and not torch.is_autocast_enabled(h.device.type)):  # autocast (bf16 training): bf16 logits below
        need = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
        return _HeadCrossEntropy.apply(h, w, y, {} if workspace is None else workspace, reduction == "mean", need)
    return F.cross_entropy(backbone.lm_logits(h).float(), y, reduction=reduction)  # logits: (N, V)


class CausalLM(nn.Module):
    """A Transformer and its next-token loss in one forward: DDP and FSDP then see the LM head (tied to
    the embeddings or not) inside the call they wrap. Without labels it returns logits (B, T, V)."""

    def __init__(self, backbone: Transformer, fused_loss: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.fused_loss = fused_loss
        self._workspace: dict[str, torch.Tensor] = {}  # the fused loss's logits buffer, reused across steps

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean",
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, labels, attention_mask: (B, T); labels[:, t] is the token position t predicts, or IGNORE
        h = self.backbone(input_ids, attention_mask)  # (B, T, D)
        if labels is None:
            return self.backbone.lm_logits(h)  # (B, T, V)
        return lm_head_loss(self.backbone, h, labels, reduction, self.fused_loss, self._workspace)


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int | torch.Tensor]:
    """The Trainer's loss_fn for every causal-LM run: (mean loss over the targets, number of targets).

    batch: input_ids (B, T), labels (B, T) = the next token at each position (IGNORE on prompt and padding
    tokens), optional attention_mask (B, T). `model` is a CausalLM or a bare Transformer, either possibly
    wrapped by DDP (`.module`); a CausalLM runs the head inside the wrapper's forward, which FSDP needs.
    The count is an int for labels on the CPU, and a 0-d tensor on an accelerator, where int() would make the
    host wait for the device before the forward is even queued.
    """
    ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
    count = (labels != IGNORE).sum()  # ()
    n = int(count) if count.device.type == "cpu" else count
    inner = getattr(model, "module", model)
    if isinstance(inner, CausalLM):
        return model(ids, labels, attention_mask=mask), n
    h = model(ids, mask)  # (B, T, D): the bare backbone (fine-tuning, LoRA)
    return lm_head_loss(inner, h, labels), n




def pool(h: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, D) -> (B, D).

    "last" takes the last real token found from the attention mask, not from token ids, so it is right
    under left or right padding and when the pad id equals the eos id (the GPT-2 classification pitfall).
    """
    B, T, _ = h.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=h.device)
    m = attention_mask[:, -T:].to(h.device)
    if how == "last":
        idx = (m.long() * torch.arange(1, T + 1, device=h.device)).argmax(-1)  # (B,) last position with mask 1
        return h[torch.arange(B, device=h.device), idx]
    if how == "cls":
        return h[:, 0]
    if how == "mean":
        w = m.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
    raise ConfigError(f"pooling {how!r} is not one of {POOLINGS}")


def default_pooling(cfg: ModelConfig) -> str:
    return cfg.pooling or ("last" if cfg.causal else "cls")  # cfg.pooling: what the checkpoint's config names


def prediction_head(backbone: Transformer) -> None:
    """Give a backbone whose family's task heads start with a dense + act + LayerNorm head (modernbert's `head`,
    our pooler + pooler_norm) one, untrained, when its checkpoint had none (a bare ModernBertModel)."""
    cfg = backbone.cfg
    if not cfg.pooler_norm or backbone.pooler is not None:
        return
    ref = backbone.embed.tok.weight
    backbone.pooler = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.pooler_bias, device=ref.device, dtype=ref.dtype)
    nn.init.normal_(backbone.pooler.weight, std=0.02)
    if backbone.pooler.bias is not None:
        nn.init.zeros_(backbone.pooler.bias)
    backbone.pooler_norm = make_norm(cfg).to(device=ref.device, dtype=ref.dtype)
    cfg.pooler = True


def pooler_head(backbone: Transformer, pooled: torch.Tensor) -> torch.Tensor:
    """The encoder's dense layer before the classifier: (..., D) -> (..., D). bert's pooler (dense + tanh),
    distilbert's pre_classifier (+ relu), ModernBertPredictionHead (dense + gelu + LayerNorm)."""
    cfg = backbone.cfg
    x = backbone.pooler(pooled)
    x = torch.tanh(x) if cfg.pooler_act == "tanh" else activation(cfg.pooler_act)(x)
    return backbone.pooler_norm(x) if backbone.pooler_norm is not None else x


class SequenceClassifier(nn.Module):
    """Backbone + pooling + linear classifier. Names follow HF: `score` for decoders, `classifier` for encoders
    (roberta's `classifier.out_proj`; the dense layer before it is the backbone's pooler, as is distilbert's
    `pre_classifier`)."""

    def __init__(self, backbone: Transformer, num_labels: int, pooling: str | None = None) -> None:
        super().__init__()
        cfg = backbone.cfg
        self.backbone = backbone
        self.pooling = pooling or default_pooling(cfg)
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling {self.pooling!r} is not one of {POOLINGS}")
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.family == "distilbert" and backbone.pooler is None and self.pooling == "cls":
            # DistilBertForSequenceClassification's head starts with pre_classifier (dense + relu): our pooler
            ref = backbone.embed.tok.weight
            backbone.pooler = nn.Linear(cfg.d_model, cfg.d_model, device=ref.device, dtype=ref.dtype)
            nn.init.normal_(backbone.pooler.weight, std=0.02)
            nn.init.zeros_(backbone.pooler.bias)
            cfg.pooler, cfg.pooler_act = True, "relu"
        if cfg.family == "modernbert":
            cfg.pooling = self.pooling  # saved as classifier_pooling
            prediction_head(backbone)
        # HF decoders (GPT2/Llama/Gemma3ForSequenceClassification) use a bias-free `score`; encoders a biased
        # `classifier` (roberta: `classifier.out_proj`, after its `classifier.dense`, which is our pooler)
        self.score = nn.Linear(cfg.d_model, num_labels, bias=not cfg.causal)
        nn.init.normal_(self.score.weight, std=0.02)
        if self.score.bias is not None:
            nn.init.zeros_(self.score.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.backbone(input_ids, attention_mask, token_type_ids=token_type_ids)  # (B, T, D)
        pooled = pool(h, attention_mask, self.pooling)  # (B, D)
        if self.backbone.pooler is not None and (self.pooling == "cls" or self.backbone.cfg.pooler_norm):
            pooled = pooler_head(self.backbone, pooled)  # bert's pooler on [CLS]; modernbert's head on any pooling
        return self.score(self.drop(pooled))  # (B, num_labels)


class SpanHead(nn.Module):
    """Start/end logits for extractive QA (HF name: qa_outputs; ModernBERT's: head, then classifier)."""

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        self.backbone = backbone
        prediction_head(backbone)  # modernbert: ModernBertForQuestionAnswering's head on every token
        self.qa_outputs = nn.Linear(backbone.cfg.d_model, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(input_ids, attention_mask, token_type_ids=token_type_ids)  # (B, T, D)
        if self.backbone.cfg.pooler_norm:
            h = pooler_head(self.backbone, h)  # (B, T, D)
        start, end = self.qa_outputs(h).unbind(-1)  # (B, T) each
        return start, end


@torch.no_grad()
def embed(backbone: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
          token_type_ids: torch.Tensor | None = None, normalize: bool = False) -> torch.Tensor:
    """Mean-pooled sentence embeddings (B, D), as sentence-transformers computes them."""
    h = backbone(input_ids, attention_mask, token_type_ids=token_type_ids)
    e = pool(h, attention_mask, "mean")
    return F.normalize(e, dim=-1) if normalize else e


@torch.inference_mode()
def embed_texts(model: Transformer, tokenizer, texts: list[str], batch_size: int = 32,
                normalize: bool = False, max_length: int | None = None) -> torch.Tensor:
    """Mean-pooled sentence embeddings (N, D), batched by length so padding stays small."""
    if tokenizer is None:
        raise TokenizerError("this model has no tokenizer files: cannot embed text")
    max_length = min(max_length or model.cfg.context_length, model.cfg.context_length)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.cfg.d_model)  # (N, D)
    dev = next(model.parameters()).device
    for s in range(0, len(texts), batch_size):
        idx = order[s: s + batch_size]
        enc = tokenizer.encode_batch([texts[i] for i in idx], max_length=max_length)
        tt = enc.get("token_type_ids")
        e = embed(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev),
                  None if tt is None else tt.to(dev), normalize=normalize)  # (b, D)
        out[idx] = e.float().cpu()
    return out
