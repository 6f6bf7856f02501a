"""`lmforge qa train|eval|predict`: extractive question answering (SQuAD) on a fine-tuned encoder."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmforge.cli.common import (
    DEVICE_HELP,
    add_fields,
    add_train_flags,
    as_flags,
    check_keep_best,
    join_workers,
    load_resume,
    non_negative_int,
    pick,
    positive_float,
    positive_int,
    prepare_run,
    read_input,
    run_dir,
    train_config,
)
from lmforge.errors import LmforgeError

QA_FLAGS: dict[str, dict] = {
    "model": dict(help="bert-family model: built-in name or HF dir"),
    "data": dict(help="SQuAD v1.1 JSON training file (required)"),
    "eval_data": dict(help="SQuAD JSON validation file (default: whole articles of --data, --eval-fraction of "
                      "the questions)"),
    "eval_fraction": dict(type=positive_float, help="share of --data held out when no --eval-data"),
    "max_length": dict(type=positive_int, help="tokens per window"),
    "doc_stride": dict(type=non_negative_int, help="tokens shared by consecutive windows"),
    "max_question_length": dict(type=positive_int, help="longer questions are cut to this many tokens"),
    "max_answer_length": dict(type=positive_int, help="longest answer in tokens"),
    "n_best": dict(type=positive_int, help="start/end candidates per window"),
    "answer_selection": dict(choices=("max", "expected-f1"), help="answer the span with the highest expected F1 "
                             "against the n-best candidates, or the most probable one (saved for eval/predict)"),
    "dropout": dict(type=float, help="dropout on embeddings and residual branches while training (attention "
                    "dropout stays 0: on CPU it leaves the fast SDPA kernel)"),
    "max_train_samples": dict(type=positive_int, help="subsample the training questions"),
    "max_eval_samples": dict(type=positive_int, help="validation questions"),
    "teacher": dict(metavar="RUN_DIR", help="distillation: qa run dirs (same tokenizer) whose averaged span "
                    "logits on the training windows the model also learns from"),
    "distill_alpha": dict(type=float, default=None, help="with --teacher: weight of the teachers' KL term, the "
                          "labels' cross-entropy gets the rest (default 0.5)"),
    "distill_temperature": dict(type=positive_float, default=None, help="with --teacher: softmax temperature of "
                                "the distillation term (default 2)"),
}
_DISTILL_KNOBS = {"distill_alpha", "distill_temperature"}  # None on the command line: QAConfig's defaults
# The measured recipe (docs/qa.md): minilm-l6, 2 epochs at lr 1e-4, batch 16, windows of 384 with stride 128,
# --precision auto. On all of SQuADShifts nyt it beat 5e-5 and longer schedules on held-out new_wiki questions.
TRAIN_DEFAULTS = {"epochs": 2.0, "batch_size": 16, "lr": 1e-4, "warmup": 0.1, "eval_every": 200,
                  "save_every": 200, "keep_best": "f1"}


def cmd_qa_train(a: argparse.Namespace) -> int:
    from lmforge.tasks.qa import CONFIG_FILE, EVAL_METRICS, QAConfig, train

    check_keep_best(a.keep_best, EVAL_METRICS, "qa")
    main_rank, log = join_workers(a)
    if a.resume:
        task, tc = load_resume(a, CONFIG_FILE)
        c = QAConfig(**{k: v for k, v in task.items() if k in QAConfig.__dataclass_fields__})
    else:
        if not a.data:
            raise LmforgeError("qa train: --data FILE is required (SQuAD v1.1 JSON)")
        given = {k: v for k, v in pick(a, QA_FLAGS).items() if v is not None or k not in _DISTILL_KNOBS}
        if not a.teacher and _DISTILL_KNOBS & given.keys():
            raise LmforgeError("qa train: --distill-alpha and --distill-temperature need --teacher RUN_DIR "
                               "(the models to distill from)")
        c = QAConfig(**given)
        out = run_dir(a, "qa", c.model)
        prepare_run(a, out)
        tc = train_config(a, out)
    try:
        s = train(c, tc, resume=bool(a.resume), log=log)
    except LmforgeError as e:
        raise as_flags(e, "QAConfig") from None
    v = s["validation"]
    if main_rank:
        print(f"run: {s['run_dir']}  steps: {s['steps']} ({s['stopped']}, {s['elapsed_s']}s)  "
              f"validation exact match {v.get('exact_match', float('nan')):.2f} F1 {v.get('f1', float('nan')):.2f}")
    return 0


def _summary_path(pred: Path) -> Path:
    """summary.json beside the predictions, never over a training run's own summary.json."""
    return pred.with_name("eval_summary.json" if (pred.parent / "qa.json").exists() else "summary.json")


def cmd_qa_eval(a: argparse.Namespace) -> int:
    from lmforge.data.squad import read_squad
    from lmforge.device import resolve_device
    from lmforge.io import atomic_write
    from lmforge.tasks.evaluate import PARTIAL_SUFFIX, qa_answers
    from lmforge.tasks.qa import load_qa_ensemble, score

    device = str(resolve_device(a.device, "--device"))
    examples = read_squad(a.data)  # bad data fails before the model loads
    if a.limit:
        examples = examples[: a.limit]
    if not examples:
        raise LmforgeError(f"{a.data}: no questions to score")
    lq = load_qa_ensemble(a.model, device=device)
    if a.answer_selection:
        lq.answer_selection = a.answer_selection
    out = (Path(a.predictions) if a.predictions
           else Path(a.model[0]) / f"eval-{Path(a.data).stem}" / "predictions.jsonl")
    t0 = time.perf_counter()
    try:  # answers kept chunk by chunk: an interrupted run continues where it stopped (PartialOutputs)
        preds = qa_answers(lq, examples, a.batch_size, out, list(a.model), lambda m: print(m, file=sys.stderr),
                           "qa eval")
        rep = score(examples, preds, time.perf_counter() - t0, with_predictions=True)
        rows = rep.pop("predictions")
        atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        summary = {"model": a.model[0] if len(a.model) == 1 else a.model, "data": str(a.data), **rep,
                   "exact_match": round(rep["exact_match"], 2), "f1": round(rep["f1"], 2), "predictions": str(out)}
        atomic_write(_summary_path(out), json.dumps(summary, indent=1) + "\n")
        out.with_name(out.name + PARTIAL_SUFFIX).unlink(missing_ok=True)  # the full file replaces what it kept
    except OSError as e:
        raise LmforgeError(f"{out}: cannot write predictions ({e.strerror or e})") from None
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"exact match {summary['exact_match']:.2f}  F1 {summary['f1']:.2f}  ({summary['total']} questions, "
              f"{summary['samples_per_s']} questions/s)\npredictions: {out}")
    return 0


def cmd_qa_predict(a: argparse.Namespace) -> int:
    from lmforge.device import resolve_device
    from lmforge.tasks.qa import answer, load_qa_ensemble

    context = read_input(a.context, "context")  # a missing file fails before the model loads
    questions = [q for q in a.question if q.strip()]
    if not questions:
        raise LmforgeError("qa predict: no question given (pass QUESTION arguments)")
    lq = load_qa_ensemble(a.model, device=str(resolve_device(a.device, "--device")))
    if a.answer_selection:
        lq.answer_selection = a.answer_selection
    for r in answer(lq, context, questions, a.batch_size):
        print(json.dumps(r, ensure_ascii=False))
    return 0


ENSEMBLE_HELP = ("a qa run dir; several answer as one ensemble (their span logits averaged; same tokenizer and "
                 "windows)")


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.tasks.qa import QAConfig

    p = sub.add_parser("qa", help="extractive question answering (SQuAD): fine-tune, evaluate, answer")
    qsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    s = qsub.add_parser("train", help="fine-tune an encoder for extractive QA on SQuAD JSON",
                        description="Fine-tune a bert-family encoder (default minilm-l6) to point at the answer "
                        "span in a context. Long contexts are cut into overlapping windows. The run dir loads in "
                        "transformers' AutoModelForQuestionAnswering. The defaults are the recipe measured in "
                        "docs/qa.md.")
    add_fields(s.add_argument_group("data, windows and answers"), QAConfig, QA_FLAGS)
    add_train_flags(s, TRAIN_DEFAULTS)
    s.set_defaults(func=cmd_qa_train)

    s = qsub.add_parser("eval", help="exact match and F1 on a SQuAD JSON file; predictions JSONL")
    s.add_argument("--model", required=True, nargs="+", metavar="RUN_DIR", help=ENSEMBLE_HELP)
    s.add_argument("--data", required=True, help="SQuAD JSON file")
    s.add_argument("--limit", type=positive_int, default=None, help="first N questions")
    s.add_argument("--batch-size", type=positive_int, default=64)
    s.add_argument("--predictions", default=None, metavar="FILE", help="predictions JSONL (default: "
                   "RUN_DIR/eval-<data>/predictions.jsonl); the summary JSON goes beside it")
    s.add_argument("--answer-selection", choices=("max", "expected-f1"), default=None,
                   help="how the answer span is picked (default: the run's own, from its qa.json)")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_qa_eval)

    s = qsub.add_parser("predict", help="answer questions from a context file: JSON lines with answer, score, "
                        "start, end")
    s.add_argument("--model", required=True, nargs="+", metavar="RUN_DIR", help=ENSEMBLE_HELP)
    s.add_argument("--context", required=True, metavar="FILE", help="text file the answers come from (- = stdin)")
    s.add_argument("question", nargs="+", metavar="QUESTION")
    s.add_argument("--answer-selection", choices=("max", "expected-f1"), default=None,
                   help="how the answer span is picked (default: the run's own, from its qa.json)")
    s.add_argument("--batch-size", type=positive_int, default=64)
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.set_defaults(func=cmd_qa_predict)
