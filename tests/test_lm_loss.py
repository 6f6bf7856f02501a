"""The one causal-LM loss (lmforge.model.heads): the fused chunked head+cross-entropy equals logits ->
F.cross_entropy in value and gradients, with and without ignored (-100) labels, for a CausalLM and a bare
backbone, and seq2seq batches use its next-token label convention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model import heads
from lmforge.model.heads import IGNORE, CausalLM, lm_head_loss, lm_loss
from lmforge.model.transformer import Transformer

V = 97


def tiny(tie: bool, family: str = "gpt2") -> Transformer:
    if family == "gpt2":
        cfg = ModelConfig(family="gpt2", vocab_size=V, context_length=32, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                          norm="layernorm", mlp="gelu", activation="gelu_tanh", attn_bias=True, mlp_bias=True,
                          position="learned", tie_embeddings=tie)
    else:
        cfg = ModelConfig(family="llama", vocab_size=V, context_length=32, d_model=32, n_layers=2, n_heads=4,
                          n_kv_heads=2, d_ff=64, tie_embeddings=tie)
    torch.manual_seed(0)
    return Transformer(cfg)


def reference(bb: Transformer, ids: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    logits = bb.lm_logits(bb(ids))  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction=reduction)


def loss_and_grads(fn, bb: Transformer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    bb.zero_grad()
    loss = fn()
    (loss * 3).backward()  # a grad_output other than 1, as the Trainer's loss * n
    return loss.detach(), {k: p.grad.clone() for k, p in bb.named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("ignored", [False, True])
def test_fused_loss_equals_cross_entropy(monkeypatch, tie, ignored):
    bb = tiny(tie)
    fused = CausalLM(bb)
    x = torch.randint(0, V, (3, 17))
    ids, labels = x[:, :-1], x[:, 1:].clone()
    if ignored:  # a masked prompt and padding, as fine-tuning batches have
        labels[0, :6] = IGNORE
        labels[2, 10:] = IGNORE
    for elems in (10**9, V * 5):  # one chunk, then chunks of 5 tokens
        monkeypatch.setattr(heads, "WORKSPACE_ELEMS", elems)
        for reduction in ("mean", "sum"):
            la, ga = loss_and_grads(lambda r=reduction: fused(ids, labels, r), bb)
            lb, gb = loss_and_grads(lambda r=reduction: reference(bb, ids, labels, r), bb)
            torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-5)
            scale = max(g.abs().max().item() for g in gb.values())
            for k in ga:  # float32 rounding, summed in another order
                torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-5 * scale)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids, labels), reference(bb, ids, labels, "mean"))
    assert fused(ids).shape == (3, 16, V)  # no labels: logits


def test_plain_path_matches_fused():
    bb = tiny(False, "llama")
    x = torch.randint(0, V, (2, 12))
    labels = x[:, 1:].clone()
    labels[1, :4] = IGNORE
    h = bb(x[:, :-1])
    a = lm_head_loss(bb, h, labels)
    b = lm_head_loss(bb, h, labels, fused=False)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_lm_loss_same_for_causal_lm_and_bare_backbone():
    """The Trainer's loss_fn: pretraining passes a CausalLM, fine-tuning the backbone; one value, one count."""
    bb = tiny(True, "llama")
    x = torch.randint(0, V, (2, 10))
    mask = torch.ones_like(x)
    mask[1, 7:] = 0
    labels = torch.full_like(x, IGNORE)
    labels[:, 3:-1] = x[:, 4:]  # targets after a 3-token prompt, the next token at each position
    labels[mask == 0] = IGNORE
    batch = {"input_ids": x, "attention_mask": mask, "labels": labels}
    (a, na), (b, nb) = lm_loss(CausalLM(bb), batch), lm_loss(bb, batch)
    assert na == nb == int((labels != IGNORE).sum())
    torch.testing.assert_close(a, b)
    logits = bb.logits(x, mask)
    torch.testing.assert_close(a, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE))


def test_no_targets_gives_zero_loss_with_gradients():
    bb = tiny(True)
    x = torch.randint(0, V, (2, 8))
    loss, n = lm_loss(bb, {"input_ids": x, "labels": torch.full_like(x, IGNORE)})
    assert n == 0 and float(loss.detach()) == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in bb.parameters())


def test_seq2seq_collate_labels_are_next_tokens():
    from lmforge.tasks.seq2seq import Seq2SeqExample, collate

    a = Seq2SeqExample([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9])  # prompt 5 6, target 7 8 9
    b = Seq2SeqExample([5, 6, 7], [IGNORE, 6, 7])
    batch = collate([a, b], pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE, 7, 8, 9, IGNORE], [6, 7, IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_right_padded_batch_takes_the_causal_path_and_equals_rows_alone(family):
    """A right-padded training batch drops its mask for SDPA's is_causal (pads come after every real token, so
    no real token can see one); the loss and every gradient equal those of the rows run one by one, unpadded.
    A left-padded mask still builds its mask."""
    bb = tiny(False, family)
    lens = [16, 11, 5]
    x = torch.randint(1, V, (3, 16))
    mask = (torch.arange(16)[None] < torch.tensor(lens)[:, None]).long()  # (3, 16), right padding
    labels = torch.full_like(x, IGNORE)
    for i, n in enumerate(lens):
        labels[i, 2: n - 1] = x[i, 3:n]  # a masked prompt, then next-token targets
    assert bb._masks(mask, 3, 16, 0, x.device) == (None, None)
    assert bb._masks(mask.flip(1), 3, 16, 0, x.device)[0] is not None  # left padding keeps its mask
    batch = {"input_ids": x, "labels": labels, "attention_mask": mask}
    la, ga = loss_and_grads(lambda: lm_loss(bb, batch)[0], bb)
    n_all = int((labels != IGNORE).sum())

    def rows_alone() -> torch.Tensor:
        total = sum(lm_loss(bb, {"input_ids": x[i: i + 1, :n], "labels": labels[i: i + 1, :n]})[0]
                    * int((labels[i, :n] != IGNORE).sum()) for i, n in enumerate(lens))
        return total / n_all

    lb, gb = loss_and_grads(rows_alone, bb)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=k)
