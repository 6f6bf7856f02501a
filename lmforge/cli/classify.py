"""`lmforge classify train|eval|predict`: text classifiers on a pretrained model (or GloVe vectors)."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.cli.common import (
    DEVICE_HELP,
    LORA_FLAGS,
    QUANTIZE_BASE_FLAG,
    add_fields,
    add_train_flags,
    check_keep_best,
    join_workers,
    load_resume,
    non_negative_int,
    pick,
    positive_int,
    prepare_run,
    read_texts,
    run_dir,
    train_config,
)

DATA_FLAGS: dict[str, dict] = {
    "text_column": dict(help="column (CSV/TSV) or field (JSONL) holding the text"),
    "text_pair_column": dict(help="second text, for sentence pairs"),
    "label_column": dict(help="column or field holding the label"),
    "encoding": dict(help="file encoding (default: utf-8), e.g. latin-1"),
    "strict": dict(help="fail on empty text rows instead of skipping them"),
}
MODEL_FLAGS: dict[str, dict] = {
    "model": dict(help="minilm-l6 | smollm2-135m-instruct | glove-6b-50d | a HF dir / GGUF / hub id"),
    "data": dict(help="built-in dataset (tweets-sentiment, bbc-news) or a CSV/TSV/JSONL file"),
    "eval_data": dict(help="validation file (default: a stratified split of --data)"),
    "max_length": dict(type=positive_int, help="tokens per text"),
    "pooling": dict(choices=["last", "cls", "mean"], help="default: last non-pad token for decoders, cls for "
                    "encoders"),
    "padding_side": dict(choices=["right", "left"]),
    "max_train_samples": dict(type=non_negative_int, help="subsample the training set (0 = all)"),
    "max_eval_samples": dict(type=positive_int, help="validation rows"),
    **LORA_FLAGS,
    "quantize": QUANTIZE_BASE_FLAG,
}
TASK_DEFAULTS = {"max_train_samples": 8000}  # the 2-3 minute budget on 2 CPU cores
TRAIN_DEFAULTS = {"epochs": None, "batch_size": None, "lr": None, "warmup": 0.1, "eval_every": 100,
                  "save_every": 100, "keep_best": "accuracy"}
TRAIN_HELPS = {"epochs": "passes over the data (default: 1; 5 for glove-6b-50d)",
               "batch_size": "examples per device per micro-batch (default: 32; 64 for glove-6b-50d)",
               "lr": "peak learning rate (default: 5e-5; 1e-3 with --lora or glove-6b-50d)"}


def cmd_train(a: argparse.Namespace) -> int:
    from lmforge.tasks.classify import EVAL_METRICS, GLOVE, ClassifyConfig, train

    check_keep_best(a.keep_best, EVAL_METRICS, "classify")
    main_rank, log = join_workers(a)
    if a.resume:
        task, tc = load_resume(a, "classify_config.json")
        c = ClassifyConfig(**task)
    else:
        c = ClassifyConfig(**pick(a, DATA_FLAGS), **pick(a, MODEL_FLAGS))
        out = run_dir(a, "classify", c.model)
        prepare_run(a, out)
        light = c.model == GLOVE
        tc = train_config(a, out, {"epochs": 5.0 if light else 1.0, "batch_size": 64 if light else 32,
                                   "lr": 1e-3 if light or c.lora else 5e-5})
    summary = train(c, tc, resume=bool(a.resume), log=log)
    v = summary["validation"]
    if main_rank:
        print(f"run: {summary['run_dir']}  steps: {summary['steps']} ({summary['stopped']}, {summary['elapsed_s']}s)  "
              f"validation accuracy {v.get('accuracy', float('nan')):.4f} "
              f"macro-F1 {v.get('macro_f1', float('nan')):.4f}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from pathlib import Path

    from lmforge.device import resolve_device
    from lmforge.metrics import format_report, plot_confusion_matrix
    from lmforge.tasks.classify import ClassifyConfig, evaluate, load_classifier, load_eval_examples

    lc = load_classifier(a.model, device=str(resolve_device(a.device, "--device")))
    c = ClassifyConfig(**pick(a, DATA_FLAGS))
    examples = load_eval_examples(a.data, c, a.limit)
    rep = evaluate(lc, examples, a.batch_size)
    png = Path(a.plot) if a.plot else Path(a.model) / "confusion_matrix.png"
    try:
        plot_confusion_matrix(rep, png, title=f"{Path(a.model).name} on {Path(a.data).name}")
        rep["confusion_matrix_png"] = str(png)
    except OSError as e:
        print(f"lmforge: warning: {png}: confusion matrix not written ({e.strerror or e})", file=sys.stderr)
    if a.json:
        print(json.dumps(rep, indent=1))
    else:
        print(format_report(rep))
        print(f"\n{rep['examples']} examples, {rep['samples_per_s']} samples/s; confusion matrix: {png}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from lmforge.device import resolve_device
    from lmforge.tasks.classify import load_classifier, predict

    texts = read_texts(a.text, "classify predict")
    lc = load_classifier(a.model, device=str(resolve_device(a.device, "--device")))
    for t, r in zip(texts, predict(lc, texts, a.batch_size)):
        print(json.dumps({"text": t, **r}, ensure_ascii=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.tasks.classify import ClassifyConfig

    p = sub.add_parser("classify", help="fine-tune, evaluate and use text classifiers")
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    s = csub.add_parser("train", help="fine-tune a classifier (defaults: minilm-l6 on tweets-sentiment, 2-3 min)",
                        description="Fine-tune a pretrained model (or GloVe vectors) for text classification. "
                        "DATA is a built-in dataset (tweets-sentiment, bbc-news) or a CSV/TSV/JSONL file.")
    add_fields(s.add_argument_group("data"), ClassifyConfig, DATA_FLAGS)
    add_fields(s.add_argument_group("model"), ClassifyConfig, MODEL_FLAGS, TASK_DEFAULTS)
    add_train_flags(s, TRAIN_DEFAULTS, TRAIN_HELPS)
    s.set_defaults(func=cmd_train)

    s = csub.add_parser("eval", help="accuracy, macro-F1, per-class precision/recall, confusion matrix")
    s.add_argument("--model", required=True, metavar="RUN_DIR")
    s.add_argument("--data", required=True, help="built-in dataset (its test split) or a labelled file")
    s.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate on the first N (class-balanced) examples")
    s.add_argument("--batch-size", type=positive_int, default=64)
    s.add_argument("--json", action="store_true")
    s.add_argument("--plot", default=None, help="confusion-matrix PNG path (default: RUN_DIR/confusion_matrix.png)")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_fields(s.add_argument_group("data"), ClassifyConfig, DATA_FLAGS)
    s.set_defaults(func=cmd_eval)

    s = csub.add_parser("predict", help="label texts (args or stdin lines): JSONL with label and probabilities")
    s.add_argument("--model", required=True, metavar="RUN_DIR")
    s.add_argument("text", nargs="*", metavar="TEXT")
    s.add_argument("--batch-size", type=positive_int, default=64)
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.set_defaults(func=cmd_predict)

