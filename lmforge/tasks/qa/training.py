"""QA training: features -> Trainer -> run dir, with optional distillation from the averaged span logits of
teacher runs (computed once per run dir and cached there)."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.io import atomic_write
from lmforge.tasks.common import TaskRun, check_resumable, find_run_dir, run_training
from lmforge.tasks.qa.config import EVAL_METRICS, RUN_INFO, QAConfig
from lmforge.tasks.qa.data import load_data, make_collate, make_features, pair_template, span_logits, span_loss
from lmforge.tasks.qa.inference import ensemble_logits
from lmforge.tasks.qa.model import build_model, load_qa_ensemble, save_qa
from lmforge.tasks.qa.postprocess import best_answers


def _run_info(settings: dict[str, Any], base_model: str) -> dict[str, Any]:
    keys = ("max_length", "doc_stride", "max_question_length", "max_answer_length", "n_best", "answer_selection")
    return {**{k: settings[k] for k in keys}, "base_model": base_model}


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
        raise ConfigError("QAConfig.teacher: an empty list; pass one or more qa run dirs, or None for no distillation")
    if not 0.0 <= c.distill_alpha <= 1.0 or c.distill_temperature <= 0:
        raise ConfigError(f"QAConfig.distill_alpha must be in [0, 1] and QAConfig.distill_temperature > 0, got "
                          f"{c.distill_alpha} and {c.distill_temperature}")


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


def add_teacher_logits(c: QAConfig, tok, feats: list[dict[str, Any]], run_dir: Path, device: str | torch.device,
                       log) -> None:
    """The teachers' averaged span logits on each training window, as feats[i]["teacher_start"/"teacher_end"];
    computed once per run dir (TEACHER_CACHE, written atomically) on the training device and reused on --resume.
    Under torchrun the first rank of each node computes them while the others wait, then read its file."""
    from safetensors.numpy import save_file

    from lmforge.device import resolve_device
    from lmforge.train.strategy import leader_first

    teachers = list(c.teacher or ())  # train() calls this only with teachers
    key, cache = _teacher_key(teachers, feats), run_dir / TEACHER_CACHE

    def get_or_build() -> dict[str, np.ndarray]:
        got = _read_teacher_cache(cache, key)
        if got is not None:
            log(f"distillation: teacher logits of {len(feats)} windows read from {cache}")
            return got
        t0 = time.perf_counter()
        lq = load_qa_ensemble(teachers, device=str(resolve_device(device, "device")))
        if lq.tokenizer.backend.to_str() != tok.backend.to_str():
            raise CheckpointError(f"QAConfig.teacher {teachers[0]}: its tokenizer differs from {c.model}'s; the "
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
    from lmforge.train import seed_everything

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
        add_teacher_logits(c, tok, train_feats, Path(tc.output_dir), tc.resolved_device(), log)
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
