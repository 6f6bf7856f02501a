"""Extractive question answering (SQuAD): data -> windowed features -> SpanHead encoder -> Trainer -> run dir.

Each question is paired with its context as [CLS] question [SEP] context-window [SEP]: only the context is cut,
into windows of `max_length` tokens that overlap by `doc_stride` tokens, so an answer near a cut still lies whole
inside some window. Offsets map every context token back to its characters, which turns the training answer into
start/end token labels (CLS, position 0, when the answer is not in a window) and a predicted token span back
into the exact context substring.

A run directory is a Hugging Face model directory at its root (config.json, model.safetensors with `qa_outputs`,
tokenizer files) plus qa.json (windowing settings) and the trainer's files; transformers'
AutoModelForQuestionAnswering loads the root.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.squad import SquadExample, read_squad
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.io import atomic_write
from lmforge.tasks.common import TaskRun, check_resumable, find_run_dir, run_training, write_json
from lmforge.train.batching import pad_batch

RUN_INFO = "qa.json"
EVAL_METRICS = ("exact_match", "f1", "eval_loss")
CONFIG_FILE = "qa_config.json"
_ARCH = {"bert": "BertForQuestionAnswering"}


@dataclass
class QAConfig:
    """What to train on and how to window it; the loop's own knobs are in TrainConfig."""

    model: str = "minilm-l6"
    data: str | None = None  # SQuAD v1.1 JSON
    eval_data: str | None = None  # default: a seeded split of `data` by article (title), so contexts do not leak
    eval_fraction: float = 0.1
    max_length: int = 384  # tokens per window, special tokens included
    doc_stride: int = 128  # tokens shared by consecutive windows of one context (transformers' `stride`)
    max_question_length: int = 64  # longer questions are cut to this many tokens
    max_answer_length: int = 30  # tokens; longer predicted spans are discarded
    n_best: int = 20  # start and end candidates per window
    # "expected-f1" or "max" (best_answers); saved in qa.json for eval and predict. expected-f1 scored higher out
    # of domain (Amazon and Reddit questions) with two models, 0.2 lower in domain (docs/qa.md)
    answer_selection: str = "expected-f1"
    dropout: float = 0.0  # on embeddings and residual branches while training; attention dropout stays 0
    max_train_samples: int | None = None  # questions
    max_eval_samples: int | None = 1000
    # distillation: qa run dirs (same tokenizer) whose averaged span logits on the training windows the model also
    # learns from, loss = (1 - distill_alpha) * labels' cross-entropy + distill_alpha * T^2 * KL at temperature T.
    # Why: one model that answers like an ensemble, at one model's inference cost (docs/qa.md)
    teacher: list[str] | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
                        "(pass --eval-data)")
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
        raise ConfigError("qa train: no training data (--data squad.json)")
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
        raise ConfigError(f"--doc-stride must be >= 0, got {doc_stride}")
    if max_question_length < 1:
        raise ConfigError(f"--max-question-length must be >= 1, got {max_question_length}")
    room = max_length - t.n_special - max_question_length
    if room <= doc_stride:
        raise ConfigError(f"--doc-stride {doc_stride} must be below the context tokens per window ({room} = "
                          f"--max-length {max_length} - --max-question-length {max_question_length} - "
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


# ---- post-processing ---------------------------------------------------------------------------------------
SELECTIONS = ("max", "expected-f1")


def _trimmed(context: str, a: int, b: int) -> tuple[int, int]:
    """Character span [a, b) without its outer whitespace."""
    raw = context[a:b]
    a += len(raw) - len(raw.lstrip())
    b -= len(raw) - len(raw.rstrip())
    return a, max(a, b)


def _expected_f1_pick(texts: Sequence[str], probs: np.ndarray) -> int:
    """Index of the candidate whose expected SQuAD F1 against the candidate distribution is highest.

    Minimum-Bayes-risk choice: the answer the model's own probabilities say scores best on the metric. A
    long span that overlaps most of the probability mass can beat the single most likely short span, and
    several windows' copies of one answer pool their mass. Ties keep the more probable candidate.
    """
    from lmforge.metrics import squad_normalize, token_f1

    toks = [squad_normalize(t).split() for t in texts]
    k = len(toks)
    f1 = np.zeros((k, k))  # (k, k), symmetric; an empty answer scores 0 even against itself, as in SQuAD v1.1
    for i in range(k):
        for j in range(i, k):
            f1[i, j] = f1[j, i] = (1.0 if toks[i] else 0.0) if toks[i] == toks[j] else token_f1(toks[i], toks[j])
    return int(np.argmax(f1 @ probs))  # first maximum = most probable among equals (cands are sorted)


def best_answers(examples: Sequence[SquadExample], feats: list[dict[str, Any]], starts: Sequence[np.ndarray],
                 ends: Sequence[np.ndarray], n_best: int = 20, max_answer_length: int = 30,
                 selection: str = "max") -> list[dict[str, Any]]:
    """The best span of each example over all its windows -> {answer, score, start, end, logit}.

    In each window the `n_best` highest start and end logits over the context tokens are paired; spans with
    end < start or longer than `max_answer_length` tokens are discarded; the `n_best` spans with the highest
    start + end logit over all windows are the candidates, with softmax probabilities over them. selection
    "max" answers the most probable candidate; "expected-f1" the one with the highest expected F1 against the
    others (`_expected_f1_pick`). The span's offsets give the context substring (outer whitespace trimmed).
    score: the chosen candidate's probability; start/end: character offsets (end exclusive).
    """
    if selection not in SELECTIONS:
        raise ConfigError(f"answer selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    by_example: dict[int, list[int]] = defaultdict(list)
    for fi, f in enumerate(feats):
        by_example[f["example"]].append(fi)
    out: list[dict[str, Any]] = []
    for ei, ex in enumerate(examples):
        cands: list[tuple[float, int, int]] = []  # (start + end logit, char start, char end)
        for fi in by_example.get(ei, []):
            f = feats[fi]
            c0, offs = f["context_start"], f["offsets"]
            s = np.asarray(starts[fi][c0: c0 + len(offs)], dtype=np.float64)
            e = np.asarray(ends[fi][c0: c0 + len(offs)], dtype=np.float64)
            k = min(n_best, len(offs))
            si = np.argsort(-s, kind="stable")[:k]  # (k,) context-token indices
            ej = np.argsort(-e, kind="stable")[:k]
            length = ej[None, :] - si[:, None]  # (k, k) last - first
            total = s[si][:, None] + e[ej][None, :]
            ok = (length >= 0) & (length < max_answer_length)
            for a, b in zip(*np.nonzero(ok)):
                cands.append((float(total[a, b]), offs[si[a]][0], offs[ej[b]][1]))
        if not cands:
            out.append({"answer": "", "score": 0.0, "start": None, "end": None, "logit": None})
            continue
        cands.sort(key=lambda x: -x[0])
        cands = cands[:max(1, n_best)]
        logits = np.array([c[0] for c in cands])
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        spans = [_trimmed(ex.context, a, b) for _, a, b in cands]
        i = 0 if selection == "max" else _expected_f1_pick([ex.context[a:b] for a, b in spans], probs)
        a, b = spans[i]
        out.append({"answer": ex.context[a:b], "score": round(float(probs[i]), 6), "start": a, "end": b,
                    "logit": round(cands[i][0], 4)})
    return out


# ---- models ------------------------------------------------------------------------------------------
def build_model(c: QAConfig):
    """-> (SpanHead, tokenizer): the pretrained encoder with a new qa_outputs layer."""
    from lmforge.checkpoints import load_checkpoint
    from lmforge.model.heads import SpanHead
    from lmforge.model.transformer import set_dropout

    ck = load_checkpoint(c.model)
    if ck.cfg.family != "bert":
        raise ConfigError(f"{c.model}: extractive QA needs a bidirectional encoder (bert family); this is a "
                          f"{ck.cfg.family} model")
    if ck.tokenizer is None:
        raise ConfigError(f"{c.model}: has no tokenizer files, cannot tokenize questions")
    if c.max_length > ck.cfg.context_length:
        raise ConfigError(f"--max-length {c.max_length} is above the model's context length "
                          f"{ck.cfg.context_length} ({c.model})")
    if ck.tokenizer.pad_id is None:
        raise ConfigError(f"{c.model}: tokenizer has neither a pad nor an eos token to pad batches with")
    if not 0.0 <= c.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {c.dropout}")
    model = SpanHead(ck.model)
    set_dropout(model, c.dropout, attention=False)
    nn.init.normal_(model.qa_outputs.weight, std=0.02)
    nn.init.zeros_(model.qa_outputs.bias)
    model.train()
    return model, ck.tokenizer


def _run_info(settings: dict[str, Any], base_model: str) -> dict[str, Any]:
    keys = ("max_length", "doc_stride", "max_question_length", "max_answer_length", "n_best", "answer_selection")
    return {**{k: settings[k] for k in keys}, "base_model": base_model}


def save_qa(model: nn.Module, tok, info: dict[str, Any], path: str | Path) -> None:
    """HF directory (loads in AutoModelForQuestionAnswering) + qa.json with the windowing settings."""
    from lmforge.checkpoints import save_pretrained

    path = Path(path)
    arch = _ARCH.get(model.backbone.cfg.family)
    save_pretrained(model, path, tokenizer=tok, extra_config={"architectures": [arch]} if arch else None)
    write_json(path / RUN_INFO, info)


# ---- training ----------------------------------------------------------------------------------------
def _feature_loss(feats: list[dict[str, Any]], starts, ends) -> float:
    """Mean span loss of labelled features, from already computed logits."""
    tot, n = 0.0, 0
    for f, s, e in zip(feats, starts, ends):
        if f.get("start", -1) < 0:
            continue
        ls = F.cross_entropy(torch.from_numpy(s)[None], torch.tensor([f["start"]]))
        le = F.cross_entropy(torch.from_numpy(e)[None], torch.tensor([f["end"]]))
        tot += float(ls + le) / 2
        n += 1
    return tot / max(n, 1)


TEACHER_CACHE = "teacher_logits.safetensors"  # in the run dir: a resumed run does not recompute them


def _teacher_key(teachers: Sequence[str], feats: list[dict[str, Any]]) -> str:
    """What the cached logits depend on: the teachers' weight and tokenizer files (path, size, mtime) and every
    window's ids. A matching key means the teachers passed the tokenizer check when the cache was written."""
    h = hashlib.sha256()
    for d in teachers:
        p = find_run_dir(d, RUN_INFO) or Path(d)
        for f in sorted([*p.glob("*.safetensors"), *p.glob("tokenizer*.json")]):
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    for f in feats:
        h.update(np.asarray(f["input_ids"], np.int32).tobytes() + b"|")
    return h.hexdigest()


def _check_distillation(c: QAConfig) -> None:
    if c.teacher is None:
        return
    if not c.teacher:
        raise ConfigError("teacher: an empty list; pass one or more qa run dirs, or None for no distillation")
    if not 0.0 <= c.distill_alpha <= 1.0 or c.distill_temperature <= 0:
        raise ConfigError(f"--distill-alpha must be in [0, 1] and --distill-temperature > 0, got {c.distill_alpha}"
                          f" and {c.distill_temperature}")


def _read_teacher_cache(cache: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached {"start", "end"} logits (all windows, concatenated) when `cache` holds `key`'s, else None."""
    from safetensors import safe_open

    try:  # a cache for other teachers or windows, or an unreadable one, is recomputed (and replaced)
        with safe_open(str(cache), "np") as fh:
            if (fh.metadata() or {}).get("key") == key:
                return {k: fh.get_tensor(k) for k in ("start", "end")}
    except Exception:  # noqa: BLE001 - missing or not a safetensors file (its error types vary by version)
        pass
    return None


def _add_teacher_logits(c: QAConfig, tok, feats: list[dict[str, Any]], run_dir: Path, device: str,
                        log) -> None:
    """The teachers' averaged span logits on each training window, as feats[i]["teacher_start"/"teacher_end"];
    computed once per run dir (TEACHER_CACHE, written atomically) on the training device and reused on --resume.
    Under torchrun the first rank of each node computes them while the others wait, then read its file."""
    from safetensors.numpy import save_file

    from lmforge.train.strategy import leader_first
    from lmforge.train.trainer import resolve_device

    teachers = list(c.teacher or ())  # train() calls this only with teachers
    key, cache = _teacher_key(teachers, feats), run_dir / TEACHER_CACHE

    def get_or_build() -> dict[str, np.ndarray]:
        got = _read_teacher_cache(cache, key)
        if got is not None:
            log(f"distillation: teacher logits of {len(feats)} windows read from {cache}")
            return got
        t0 = time.perf_counter()
        lq = load_qa_ensemble(teachers, device=str(resolve_device(device)))
        if lq.tokenizer.backend.to_str() != tok.backend.to_str():
            raise CheckpointError(f"--teacher {teachers[0]}: its tokenizer differs from {c.model}'s; the "
                                  "teacher must read the same windows")
        starts, ends = ensemble_logits(lq, feats, desc="teacher logits", progress=True)
        flat = {"start": np.concatenate(starts).astype(np.float32), "end": np.concatenate(ends).astype(np.float32)}
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: save_file(flat, str(tmp), metadata={"key": key}))
        log(f"distillation: {1 + len(lq.members)} teacher model(s) on {len(feats)} windows in "
            f"{time.perf_counter() - t0:.0f}s; alpha {c.distill_alpha}, temperature {c.distill_temperature}")
        return flat

    flat = leader_first(get_or_build)
    cuts = np.cumsum([len(f["input_ids"]) for f in feats])[:-1]
    for f, s, e in zip(feats, np.split(flat["start"], cuts), np.split(flat["end"], cuts)):
        f["teacher_start"], f["teacher_end"] = s, e


def train(c: QAConfig, tc, resume: bool = False, log=print) -> dict[str, Any]:
    """Fine-tune an encoder for extractive QA; returns a summary (run dir, validation EM/F1, timings)."""
    from lmforge.metrics import squad_scores
    from lmforge.train.trainer import seed_everything

    _check_distillation(c)
    if resume:
        check_resumable(Path(tc.output_dir))
    train_ex, eval_ex, info = load_data(c, seed=tc.seed)
    seed_everything(tc.seed)
    model, tok = build_model(c)
    template = pair_template(tok)
    t0 = time.perf_counter()
    kw = dict(max_length=c.max_length, doc_stride=c.doc_stride, max_question_length=c.max_question_length,
              template=template)
    train_feats = [f for f in make_features(tok, train_ex, **kw) if f["start"] >= 0]
    dropped = len(train_ex) - len({f["example"] for f in train_feats})
    eval_feats = make_features(tok, eval_ex, **kw)
    log(f"data: {len(train_ex)} train questions -> {len(train_feats)} windows, {len(eval_ex)} validation questions "
        f"-> {len(eval_feats)} windows; tokenized in {time.perf_counter() - t0:.1f}s")
    if dropped:
        log(f"data: skipped {dropped} training questions whose answer text is not at its answer_start")
    info["skipped_unaligned"] = dropped
    if not train_feats:
        raise DataError(f"{c.data}: no training question has its answer text at its answer_start")
    if c.teacher:
        _add_teacher_logits(c, tok, train_feats, Path(tc.output_dir), tc.device, log)
    collate = make_collate(tok.pad_id)

    def eval_fn(m: nn.Module) -> dict[str, float]:
        starts, ends = span_logits(m, eval_feats, collate)
        preds = best_answers(eval_ex, eval_feats, starts, ends, c.n_best, c.max_answer_length, c.answer_selection)
        sc = squad_scores({ex.id: p["answer"] for ex, p in zip(eval_ex, preds)}, eval_ex)
        return {"exact_match": sc["exact_match"], "f1": sc["f1"], "eval_loss": _feature_loss(eval_feats, starts, ends)}

    run_info = _run_info(c.to_dict(), c.model)
    loss_fn = functools.partial(span_loss, alpha=c.distill_alpha, temperature=c.distill_temperature)
    run = TaskRun("qa", c.to_dict(), model, train_feats, loss_fn,
                  save_fn=lambda m, d, _sd: save_qa(m, tok, run_info, d),
                  eval_fn=eval_fn, eval_metrics=EVAL_METRICS, n_eval=len(eval_feats), collate_fn=collate,
                  lengths=[len(f["input_ids"]) for f in train_feats],
                  find_unused_parameters=True,  # BERT's pooler: span QA never runs it
                  summary={"data": info})
    return run_training(run, tc, resume=resume)


# ---- loading and using a trained model -----------------------------------------------------------------
@dataclass
class LoadedQA:
    model: nn.Module  # SpanHead
    tokenizer: Any
    max_length: int = 384
    doc_stride: int = 128
    max_question_length: int = 64
    max_answer_length: int = 30
    n_best: int = 20
    answer_selection: str = "expected-f1"
    info: dict = field(default_factory=dict)
    template: PairTemplate | None = None
    members: list[nn.Module] = field(default_factory=list)  # more SpanHeads whose logits are averaged with model's


def load_qa(run_dir: str | Path, device: str = "cpu") -> LoadedQA:
    """A qa run dir (or its best/ or final/), or any HF bert directory with qa_outputs tensors."""
    from lmforge.checkpoints import load_checkpoint
    from lmforge.checkpoints.hf import load_into
    from lmforge.model.heads import SpanHead

    p = find_run_dir(run_dir, RUN_INFO) or Path(run_dir)  # or a plain HF directory
    if not (p / RUN_INFO).exists() and not (p / "config.json").exists():
        raise CheckpointError(f"{p}: not a question-answering run directory (no {RUN_INFO} or config.json; "
                              "train one with `lmforge qa train`)")
    info: dict[str, Any] = {}
    if (p / RUN_INFO).exists():
        try:
            info = json.loads((p / RUN_INFO).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p / RUN_INFO}: not valid JSON ({e.msg} at line {e.lineno})") from None
    ck = load_checkpoint(p, device=device)
    if ck.tokenizer is None:
        raise CheckpointError(f"{p}: no tokenizer files")
    head = {k.split(".", 1)[1]: v for k, v in ck.heads.items() if k.startswith("qa_outputs.")}
    if not head:
        raise CheckpointError(f"{p}: no qa_outputs tensors (not a question-answering model; train one with "
                              "`lmforge qa train`)")
    model = SpanHead(ck.model)
    load_into(model.qa_outputs, head, str(p))
    defaults = QAConfig()
    settings = {k: int(info.get(k, getattr(defaults, k)))
                for k in ("max_length", "doc_stride", "max_question_length", "max_answer_length", "n_best")}
    settings["max_length"] = min(settings["max_length"], ck.cfg.context_length)
    settings["answer_selection"] = str(info.get("answer_selection", "max"))  # runs saved before it existed: max
    if settings["answer_selection"] not in SELECTIONS:
        raise CheckpointError(f"{p / RUN_INFO}: answer_selection must be one of {', '.join(SELECTIONS)}, got "
                              f"{settings['answer_selection']!r}")
    return LoadedQA(model.eval().to(device), ck.tokenizer, **settings, info=info,
                    template=pair_template(ck.tokenizer))


ENSEMBLE_KEYS = ("max_length", "doc_stride", "max_question_length")  # what makes two runs' windows the same


def load_qa_ensemble(run_dirs: Sequence[str | Path], device: str = "cpu") -> LoadedQA:
    """Several qa runs that answer as one: their start and end logits are averaged on the same windows.

    Why: models trained on different data orders or splits make partly independent span errors, and the
    average scores higher out of domain than either (docs/qa.md). The runs must share the tokenizer and the
    windowing; the answer settings (n_best, max_answer_length, answer_selection) are the first run's.
    """
    if not run_dirs:
        raise ConfigError("qa: no model given")
    first, *rest = (load_qa(d, device) for d in run_dirs)
    for d, other in zip(run_dirs[1:], rest):
        if other.tokenizer.backend.to_str() != first.tokenizer.backend.to_str():
            raise CheckpointError(f"{d}: its tokenizer differs from {run_dirs[0]}'s; an ensemble needs one "
                                  "tokenizer")
        for k in ENSEMBLE_KEYS:
            if getattr(other, k) != getattr(first, k):
                raise CheckpointError(f"{d}: {k} {getattr(other, k)} differs from {run_dirs[0]}'s "
                                      f"{getattr(first, k)}; an ensemble needs the same windows")
        first.members.append(other.model)
    return first


def ensemble_logits(lq: LoadedQA, feats: list[dict[str, Any]], batch_size: int = 64, desc: str = "qa",
                    progress: bool = False, bar=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits of each feature, averaged over the model and its ensemble members (span_logits).
    progress: a bar with an ETA on stderr (on a terminal), counting windows times models; or `bar`, a tqdm bar
    of the caller's to advance."""
    from tqdm import tqdm

    collate = make_collate(lq.tokenizer.pad_id)
    with (contextlib.nullcontext(bar) if bar is not None else
          tqdm(total=len(feats) * (1 + len(lq.members)), desc=desc, unit="window",
               disable=None if progress else True)) as bar:
        runs = [span_logits(m, feats, collate, batch_size, bar) for m in (lq.model, *lq.members)]
    if len(runs) == 1:
        return runs[0]
    # an ensemble answers from the mean of its models' logits, feature by feature
    return ([np.mean(f, axis=0) for f in zip(*(r[0] for r in runs))],
            [np.mean(f, axis=0) for f in zip(*(r[1] for r in runs))])


PREDICT_CHUNK = 512  # questions answered together: the unit an interrupted evaluation keeps


def predict_examples(lq: LoadedQA, examples: Sequence[SquadExample], batch_size: int = 64,
                     selection: str | None = None, progress: bool = False,
                     done: Mapping[int, dict[str, Any]] | None = None,
                     on_chunk: Callable[[dict[int, dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """The best answer of each example, in order: {answer, score, start, end, logit}.

    selection: "max" or "expected-f1" (best_answers); None = the run's own (qa.json). progress: a bar with an
    ETA on stderr (on a terminal), counting windows times models. Examples are answered PREDICT_CHUNK at a time
    (fixed chunks, so a resumed run batches exactly as an uninterrupted one): `done` holds the answers of
    chunks already answered, by example index, which are skipped; `on_chunk` gets each new chunk's answers."""
    from tqdm import tqdm

    done = done or {}
    chunks = [range(s, min(s + PREDICT_CHUNK, len(examples))) for s in range(0, len(examples), PREDICT_CHUNK)]
    todo = [r for r in chunks if not all(i in done for i in r)]
    feats = [make_features(lq.tokenizer, [examples[i] for i in r], lq.max_length, lq.doc_stride,
                           lq.max_question_length, labels=False, template=lq.template) for r in todo]
    answers = [done.get(i) for i in range(len(examples))]
    n_models = 1 + len(lq.members)
    with tqdm(total=sum(map(len, feats)) * n_models, desc="qa", unit="window",
              disable=None if progress else True) as bar:
        for r, f in zip(todo, feats):
            starts, ends = ensemble_logits(lq, f, batch_size, bar=bar)
            got = dict(zip(r, best_answers([examples[i] for i in r], f, starts, ends, lq.n_best,
                                           lq.max_answer_length, selection or lq.answer_selection)))
            for i, p in got.items():
                answers[i] = p
            if on_chunk is not None:
                on_chunk(got)
    return answers


def answer(lq: LoadedQA, context: str, questions: Sequence[str], batch_size: int = 64) -> list[dict[str, Any]]:
    """Answer each question from `context` -> [{question, answer, score, start, end}] (start/end: characters)."""
    if not context.strip():
        raise DataError("answer: empty context")
    qs = list(questions)
    for i, q in enumerate(qs):
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"answer: question {i + 1} is empty")
    exs = [SquadExample(str(i), q, context, [], []) for i, q in enumerate(qs)]
    preds = predict_examples(lq, exs, batch_size)
    return [{"question": q, "answer": p["answer"], "score": p["score"], "start": p["start"], "end": p["end"]}
            for q, p in zip(qs, preds)]


def evaluate(lq: LoadedQA, examples: Sequence[SquadExample], batch_size: int = 64,
             with_predictions: bool = False, progress: bool = False) -> dict[str, Any]:
    """SQuAD exact match and F1 (percent, official normalisation) -> {exact_match, f1, total, missing, ...}.

    with_predictions adds "predictions": one row per question (id, question, answers, prediction, score,
    exact_match, f1).
    """
    if not examples:
        raise DataError("evaluate: no questions to score")
    t0 = time.perf_counter()
    preds = predict_examples(lq, examples, batch_size, progress=progress)
    return score(examples, preds, time.perf_counter() - t0, with_predictions)


def score(examples: Sequence[SquadExample], preds: Sequence[dict[str, Any]], seconds: float,
          with_predictions: bool = False) -> dict[str, Any]:
    """evaluate's report for answers already made (predict_examples) in `seconds`."""
    from lmforge.metrics import squad_exact_match, squad_f1, squad_scores

    rep: dict[str, Any] = squad_scores({ex.id: p["answer"] for ex, p in zip(examples, preds)}, examples)
    rep.update(examples=len(examples), elapsed_s=round(seconds, 1),
               samples_per_s=round(len(examples) / max(seconds, 1e-9), 1))
    if with_predictions:
        rep["predictions"] = [
            {"id": ex.id, "question": ex.question, "answers": ex.answers, "prediction": p["answer"],
             "score": p["score"], "start": p["start"], "exact_match": squad_exact_match(p["answer"], ex.answers),
             "f1": round(squad_f1(p["answer"], ex.answers), 4)}
            for ex, p in zip(examples, preds)]
    return rep
