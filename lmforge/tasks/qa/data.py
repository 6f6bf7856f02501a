"""QA data and features: SQuAD questions split by article, then cut into question + context-window features
with start/end labels; the collate, the span loss and the span logits of a model over those features."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.squad import SquadExample, read_squad
from lmforge.errors import ConfigError, DataError
from lmforge.tasks.qa.config import QAConfig
from lmforge.train.batching import pad_batch


# ---- data ------------------------------------------------------------------------------------------
def _subsample(examples: list[SquadExample], n: int | None, seed: int) -> list[SquadExample]:
    """A deterministic subset of n questions, in file order."""
    if not n or n >= len(examples):
        return examples
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:n])]


def split_by_article(examples: list[SquadExample], fraction: float, seed: int,
                     source: str = "data") -> tuple[list[SquadExample], list[SquadExample]]:
    """(train, validation) where whole articles (by title; by context when untitled) go to one side only.

    Splitting questions at random would put the same paragraph on both sides and overstate validation F1.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"eval_fraction must be between 0 and 1, got {fraction}")

    def groups_of(key: Callable[[SquadExample], str]) -> Counter:
        return Counter(key(e) for e in examples)

    key: Callable[[SquadExample], str] = lambda e: e.title or e.context  # noqa: E731
    sizes = groups_of(key)
    if len(sizes) < 2:
        key = lambda e: e.context  # noqa: E731 -- one article: split its paragraphs instead
        sizes = groups_of(key)
    if len(sizes) < 2:
        raise DataError(f"{source}: cannot carve a validation split: every question shares one context "
                        "(give QAConfig.eval_data)")
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    target = max(1, round(fraction * len(examples)))
    chosen: set[str] = set()
    n = 0
    for g in order:
        if n >= target:
            break
        if n + sizes[g] > 2 * target:  # one big article would swallow the training data
            continue
        chosen.add(g)
        n += sizes[g]
    if not chosen:
        chosen.add(min(order, key=lambda g: sizes[g]))
    if len(chosen) == len(sizes):
        chosen.discard(order[-1])
    train = [e for e in examples if key(e) not in chosen]
    val = [e for e in examples if key(e) in chosen]
    return train, val


def load_data(c: QAConfig, seed: int = 42) -> tuple[list[SquadExample], list[SquadExample], dict[str, Any]]:
    """-> (train, validation, info)."""
    if not c.data:
        raise ConfigError("qa train: no training data (QAConfig.data, a SQuAD JSON file)")
    train = read_squad(c.data)
    info: dict[str, Any] = {"data": c.data}
    if c.eval_data:
        evals = read_squad(c.eval_data)
        info["validation"] = str(c.eval_data)
    else:
        train, evals = split_by_article(train, c.eval_fraction, seed, c.data)
        info["validation"] = f"{len(evals)} questions ({c.eval_fraction:.0%} target) of whole articles of the " \
            "training data"
    train = _subsample(train, c.max_train_samples, seed)
    evals = _subsample(evals, c.max_eval_samples, seed)
    info.update(train_examples=len(train), eval_examples=len(evals))
    return train, evals, info


# ---- features ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairTemplate:
    """The special tokens around the question and the context, read off the tokenizer's pair post-processor.

    BERT: prefix [CLS], middle [SEP], suffix [SEP], type ids 0 / 1; a tokenizer without a pair template gives
    empty parts (the question and context are then simply concatenated).
    """

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    prefix_types: tuple[int, ...]
    middle_types: tuple[int, ...]
    suffix_types: tuple[int, ...]
    question_type: int = 0
    context_type: int = 1

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)


def pair_template(tok) -> PairTemplate:
    enc = tok.backend.encode("question", "context")  # the post-processor adds the pair's special tokens
    seq, ids, types = enc.sequence_ids, enc.ids, enc.type_ids
    q = [i for i, s in enumerate(seq) if s == 0]
    c = [i for i, s in enumerate(seq) if s == 1]
    if not q or not c or q[-1] >= c[0] or q != list(range(q[0], q[-1] + 1)) or c != list(range(c[0], c[-1] + 1)):
        raise ConfigError(f"{tok.source}: the tokenizer's pair template does not put the question before the "
                          "context; cannot build question/context windows")

    def part(a: int, b: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(ids[a:b]), tuple(types[a:b])

    (p, pt), (m, mt), (s, st) = part(0, q[0]), part(q[-1] + 1, c[0]), part(c[-1] + 1, len(ids))
    return PairTemplate(p, m, s, pt, mt, st, types[q[0]], types[c[0]])


def check_windows(max_length: int, doc_stride: int, max_question_length: int, t: PairTemplate) -> None:
    """Every window must leave room for context tokens beyond the overlap, whatever the question length."""
    if doc_stride < 0:
        raise ConfigError(f"QAConfig.doc_stride must be >= 0, got {doc_stride}")
    if max_question_length < 1:
        raise ConfigError(f"QAConfig.max_question_length must be >= 1, got {max_question_length}")
    room = max_length - t.n_special - max_question_length
    if room <= doc_stride:
        raise ConfigError(f"QAConfig.doc_stride {doc_stride} must be below the context tokens per window ({room} = "
                          f"QAConfig.max_length {max_length} - QAConfig.max_question_length {max_question_length} - "
                          f"{t.n_special} special tokens)")


def _tokenize(tok, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) per text, no special tokens, no truncation."""
    out: list[tuple[list[int], list[tuple[int, int]]]] = []
    for s in range(0, len(texts), 512):
        enc = tok.encode_batch(texts[s: s + 512], add_special_tokens=False, truncation=False, padding=False,
                               return_tensors=None, return_offsets=True)
        out.extend((ids, [(a, b) for a, b in offs]) for ids, offs in zip(enc["input_ids"], enc["offsets"]))
    return out


def answer_token_span(context: str, offsets: Sequence[tuple[int, int]], start: int,
                      text: str) -> tuple[int, int] | None:
    """Context-token indices (first, last) covering characters [start, start+len(text)), or None when the answer
    text is not at `start` or falls between tokens (whitespace only)."""
    end = start + len(text)
    if not text or context[start:end] != text:
        return None
    first = next((i for i, (_a, b) in enumerate(offsets) if b > start), None)
    last = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < end), None)
    if first is None or last is None or last < first:
        return None
    return first, last


def make_features(tok, examples: Sequence[SquadExample], max_length: int = 384, doc_stride: int = 128,
                  max_question_length: int = 64, labels: bool = True,
                  template: PairTemplate | None = None) -> list[dict[str, Any]]:
    """One feature per window: input_ids (+ token_type_ids), start/end labels, and what post-processing needs.

    Keys: input_ids, token_type_ids (tokenizers that use them), example (index into `examples`),
    context_start (position of the window's first context token), offsets (character span of each context
    token of the window), window (first, end) in context tokens, and with `labels`: start, end (0 = not here).
    Examples whose answer text is not at its answer_start get labels (-1, -1); training drops them.
    """
    t = template or pair_template(tok)
    check_windows(max_length, doc_stride, max_question_length, t)
    contexts = list(dict.fromkeys(e.context for e in examples))
    by_context = dict(zip(contexts, _tokenize(tok, contexts)))
    questions = _tokenize(tok, [e.question for e in examples])
    with_types = bool(getattr(tok, "returns_token_type_ids", False))
    feats: list[dict[str, Any]] = []
    for ei, ex in enumerate(examples):
        q_ids = questions[ei][0][:max_question_length]
        c_ids, c_off = by_context[ex.context]
        if not c_ids:
            raise DataError(f"question {ex.id!r}: the context has no tokens")
        head = [*t.prefix, *q_ids, *t.middle]
        head_types = [*t.prefix_types, *[t.question_type] * len(q_ids), *t.middle_types]
        c0 = len(head)
        room = max_length - t.n_special - len(q_ids)  # context tokens per window
        span = None
        if labels and ex.answers:
            span = answer_token_span(ex.context, c_off, ex.answer_starts[0], ex.answers[0])
        w0 = 0
        while True:
            w1 = min(len(c_ids), w0 + room)
            f: dict[str, Any] = {"input_ids": head + c_ids[w0:w1] + list(t.suffix), "example": ei,
                                 "context_start": c0, "offsets": c_off[w0:w1], "window": (w0, w1)}
            if with_types:
                f["token_type_ids"] = head_types + [t.context_type] * (w1 - w0) + list(t.suffix_types)
            if labels:
                if ex.answers and span is None:
                    f["start"] = f["end"] = -1
                elif span is not None and w0 <= span[0] and span[1] < w1:
                    f["start"], f["end"] = c0 + span[0] - w0, c0 + span[1] - w0
                else:
                    f["start"] = f["end"] = 0  # the answer is not in this window: point at CLS
            feats.append(f)
            if w1 == len(c_ids):
                break
            w0 = w1 - doc_stride
    return feats


def make_collate(pad_id: int):
    def collate(feats: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([f["input_ids"] for f in feats], pad_id)  # (B, T)
        batch = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in feats[0]:
            batch["token_type_ids"], _ = pad_batch([f["token_type_ids"] for f in feats], 0)
        if "start" in feats[0]:
            batch["start_positions"] = torch.tensor([f["start"] for f in feats], dtype=torch.long)
            batch["end_positions"] = torch.tensor([f["end"] for f in feats], dtype=torch.long)
        if "teacher_start" in feats[0]:  # (B, T) float, padding at -1e4 (no probability)
            T = batch["input_ids"].shape[1]
            for k in ("teacher_start", "teacher_end"):
                t = torch.full((len(feats), T), -1e4)
                for i, f in enumerate(feats):
                    t[i, : len(f[k])] = torch.from_numpy(f[k])
                batch[k] = t
        return batch
    return collate


def span_loss(model: nn.Module, batch: dict[str, torch.Tensor], alpha: float = 0.5,
              temperature: float = 2.0) -> tuple[torch.Tensor, int]:
    """Mean of the start and end cross-entropies; padding positions are masked so padding cannot shift the loss.

    With teacher logits in the batch (distillation): (1 - alpha) * that + alpha * T^2 * KL(teacher || model) of
    the start and end distributions at temperature T (as DistilBERT's SQuAD recipe, alpha 0.5, T 2)."""
    mask = batch["attention_mask"]
    start, end = model(batch["input_ids"], mask, batch.get("token_type_ids"))  # (B, T) each
    pad = mask == 0
    start, end = start.float().masked_fill(pad, -1e4), end.float().masked_fill(pad, -1e4)
    loss = (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2
    if "teacher_start" in batch:
        kd = sum(F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(batch[k] / temperature, -1),
                          reduction="batchmean", log_target=True)
                 for s, k in ((start, "teacher_start"), (end, "teacher_end"))) / 2
        loss = (1 - alpha) * loss + alpha * temperature ** 2 * kd
    return loss, int(mask.shape[0])


@torch.inference_mode()
def span_logits(model: nn.Module, feats: list[dict[str, Any]], collate, batch_size: int = 64,
                bar=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits of each feature over its own (unpadded) length, in feature order. `bar`: a tqdm
    bar advanced by the windows done."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    starts: list[np.ndarray] = [np.empty(0, np.float32)] * len(feats)
    ends: list[np.ndarray] = [np.empty(0, np.float32)] * len(feats)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        b = collate([feats[i] for i in idx])
        tt = b.get("token_type_ids")
        st, en = model(b["input_ids"].to(dev), b["attention_mask"].to(dev), None if tt is None else tt.to(dev))
        st, en = st.float().cpu().numpy(), en.float().cpu().numpy()
        for row, i in enumerate(idx):
            n = len(feats[i]["input_ids"])
            starts[i], ends[i] = st[row, :n], en[row, :n]
        if bar is not None:
            bar.update(len(idx))
    model.train(was_training)
    return starts, ends
