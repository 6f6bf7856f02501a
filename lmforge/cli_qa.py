"""`lmforge qa train|eval|predict`: extractive question answering (SQuAD) on a fine-tuned encoder.

cli.py calls `register(sub)` through its _EXTRA_VERBS list; its shared helpers are imported lazily so that
cli.py may import this module at any point of its own import.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.errors import LmforgeError

TRAIN_DEFAULTS = {"epochs": 2.0, "batch_size": 16, "lr": 5e-5, "warmup": 0.1, "eval_every": 200,
                  "save_every": 200, "keep_best": "f1"}


def cmd_qa_train(a: argparse.Namespace) -> int:
    from lmforge.cli import _join_workers, _load_resume, _run_dir, _train_config
    from lmforge.tasks.qa import CONFIG_FILE, QAConfig, train

    main_rank, log = _join_workers(a)
    if a.resume:
        task, tc = _load_resume(a, CONFIG_FILE)
        c = QAConfig(**{k: v for k, v in task.items() if k in QAConfig.__dataclass_fields__})
    else:
        if not a.data:
            raise LmforgeError("qa train: --data FILE is required (SQuAD v1.1 JSON)")
        c = QAConfig(model=a.model, data=a.data, eval_data=a.eval_data, eval_fraction=a.eval_fraction,
                     max_length=a.max_length, doc_stride=a.doc_stride, max_question_length=a.max_question_length,
                     max_answer_length=a.max_answer_length, n_best=a.n_best,
                     max_train_samples=a.max_train_samples or None, max_eval_samples=a.max_eval_samples or None)
        tc = _train_config(a, _run_dir(a, "qa", c.model), TRAIN_DEFAULTS)
    s = train(c, tc, resume=bool(a.resume), log=log)
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
    from lmforge.tasks.qa import evaluate, load_qa

    if a.limit is not None and a.limit < 1:
        raise LmforgeError(f"--limit must be >= 1, got {a.limit}")
    examples = read_squad(a.data)  # bad data fails before the model loads
    if a.limit:
        examples = examples[: a.limit]
    lq = load_qa(a.model)
    rep = evaluate(lq, examples, a.batch_size, with_predictions=True)
    rows = rep.pop("predictions")
    out = Path(a.predictions) if a.predictions else Path(a.model) / f"eval-{Path(a.data).stem}" / "predictions.jsonl"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        summary = {"model": str(a.model), "data": str(a.data), **rep,
                   "exact_match": round(rep["exact_match"], 2), "f1": round(rep["f1"], 2), "predictions": str(out)}
        _summary_path(out).write_text(json.dumps(summary, indent=1) + "\n")
    except OSError as e:
        raise LmforgeError(f"{out}: cannot write predictions ({e.strerror or e})") from None
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"exact match {summary['exact_match']:.2f}  F1 {summary['f1']:.2f}  ({summary['total']} questions, "
              f"{summary['samples_per_s']} questions/s)\npredictions: {out}")
    return 0


def cmd_qa_predict(a: argparse.Namespace) -> int:
    from lmforge.cli import _read_input
    from lmforge.tasks.qa import answer, load_qa

    context = _read_input(a.context, "context")  # a missing file fails before the model loads
    questions = [q for q in a.question if q.strip()]
    if not questions:
        raise LmforgeError("qa predict: no question given (pass QUESTION arguments)")
    lq = load_qa(a.model)
    for r in answer(lq, context, questions, a.batch_size):
        print(json.dumps(r, ensure_ascii=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.cli import _add_train_flags

    p = sub.add_parser("qa", help="extractive question answering (SQuAD): fine-tune, evaluate, answer")
    qsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    s = qsub.add_parser("train", help="fine-tune an encoder for extractive QA on SQuAD JSON",
                        description="Fine-tune a bert-family encoder (default minilm-l6) to point at the answer "
                        "span in a context. Long contexts are cut into overlapping windows. The run dir loads in "
                        "transformers' AutoModelForQuestionAnswering.")
    s.add_argument("--model", default="minilm-l6", help="bert-family model: built-in name or HF dir "
                   "(default: minilm-l6)")
    s.add_argument("--data", default=None, help="SQuAD v1.1 JSON training file")
    s.add_argument("--eval-data", default=None, help="SQuAD JSON validation file (default: whole articles of "
                   "--data, --eval-fraction of the questions)")
    s.add_argument("--eval-fraction", type=float, default=0.1)
    g = s.add_argument_group("windows and answers")
    g.add_argument("--max-length", type=int, default=384, help="tokens per window (default 384)")
    g.add_argument("--doc-stride", type=int, default=128, help="tokens shared by consecutive windows (default 128)")
    g.add_argument("--max-question-length", type=int, default=64)
    g.add_argument("--max-answer-length", type=int, default=30, help="longest answer in tokens (default 30)")
    g.add_argument("--n-best", type=int, default=20, help="start/end candidates per window (default 20)")
    g.add_argument("--max-train-samples", type=int, default=None, help="subsample the training questions")
    g.add_argument("--max-eval-samples", type=int, default=1000, help="validation questions (default 1000)")
    _add_train_flags(s)
    s.set_defaults(func=cmd_qa_train)

    s = qsub.add_parser("eval", help="exact match and F1 on a SQuAD JSON file; predictions JSONL")
    s.add_argument("--model", required=True, metavar="RUN_DIR")
    s.add_argument("--data", required=True, help="SQuAD JSON file")
    s.add_argument("--limit", type=int, default=None, help="first N questions")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--predictions", default=None, metavar="FILE", help="predictions JSONL (default: "
                   "RUN_DIR/eval-<data>/predictions.jsonl); the summary JSON goes beside it")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_qa_eval)

    s = qsub.add_parser("predict", help="answer questions from a context file: JSON lines with answer, score, "
                        "start, end")
    s.add_argument("--model", required=True, metavar="RUN_DIR")
    s.add_argument("--context", required=True, metavar="FILE", help="text file the answers come from (- = stdin)")
    s.add_argument("question", nargs="+", metavar="QUESTION")
    s.add_argument("--batch-size", type=int, default=64)
    s.set_defaults(func=cmd_qa_predict)
