"""Using a trained QA model: span logits (averaged over an ensemble), answers to questions, SQuAD scores."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lmforge.data.squad import SquadExample
from lmforge.errors import DataError
from lmforge.tasks.qa.data import make_collate, make_features, span_logits
from lmforge.tasks.qa.model import LoadedQA
from lmforge.tasks.qa.postprocess import best_answers


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
