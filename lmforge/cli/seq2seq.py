"""`lmforge finetune` (seq2seq fine-tuning of a decoder) and `lmforge eval` (task scores)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmforge.cli.common import (
    DEFAULT_LM,
    DEVICE_HELP,
    LORA_FLAGS,
    QUANTIZE_BASE_FLAG,
    RUN_STAMP,
    STAMP_HELP,
    add_fields,
    add_train_flags,
    check_keep_best,
    join_workers,
    load_resume,
    pick,
    positive_int,
    prepare_run,
    run_dir,
    train_config,
)
from lmforge.errors import LmforgeError

FINETUNE_FLAGS: dict[str, dict] = {
    "task": dict(choices=["summarize", "translate", "instruct"], help="the prompt the inputs are wrapped in"),
    "model": dict(help="decoder to fine-tune"),
    "data": dict(default=None, help="JSONL training file (required)"),
    "eval_data": dict(help="JSONL validation file (default: the last 5%% of --data)"),
    "input_field": dict(help="JSONL field with the input text"),
    "target_field": dict(help="JSONL field with the target text"),
    "to": dict(help="translate: target language code"),
    "src": dict(flag="--from", help="translate: source language code"),
    "sentences": dict(type=positive_int, metavar="N", help="summarize: the sentence budget the prompt states "
                      "(default: \"two or three\"); eval reuses it for the fine-tuned model"),
    "max_length": dict(type=positive_int, help="prompt + target tokens"),
    "max_target_length": dict(type=positive_int, help="target tokens"),
    "max_train_samples": dict(type=positive_int, help="subsample the training pairs"),
    "max_eval_samples": dict(type=positive_int, help="validation pairs"),
    **LORA_FLAGS,
    "quantize": QUANTIZE_BASE_FLAG,
    "lora": dict(action=argparse.BooleanOptionalAction,
                 help="train low-rank adapters on a frozen model (--no-lora: full fine-tuning)"),
}
TRAIN_DEFAULTS = {"epochs": None, "batch_size": None, "lr": None, "warmup": 0.05, "eval_every": 100,
                  "save_every": 100, "keep_best": "eval_loss"}
# Flags left at None on the command line take the task's recipe (tasks/seq2seq.py RECIPES), then these.
GENERIC = {"model": DEFAULT_LM, "lora": False, "lora_rank": 8, "lora_alpha": 16.0, "lora_targets": "q,v",
           "max_length": 512, "max_target_length": 256, "epochs": 1.0, "batch_size": 4}
RECIPE_HELP = """With no flags, --task translate and --task summarize run the measured recipes (see docs/translation.md
and docs/summarization.md); any flag given overrides its part of the recipe:
  translate  gemma3-270m, LoRA r32 (alpha 16) on all linear layers, lr 5e-4, batch 16, max length 256,
             800 steps (--epochs replaces the step budget)
  summarize  smollm2-135m-instruct, full fine-tuning, lr 1e-4, batch 8, 1 epoch, max length 640
Otherwise: smollm2-135m-instruct, full fine-tuning at lr 3e-5 (2e-4 with --lora), batch 4, 1 epoch."""
TRAIN_HELPS = {"lr": "peak learning rate (default: the task's recipe; else 3e-5, 2e-4 with --lora)",
               "epochs": "passes over the training data, fractions allowed (default: the task's recipe, else 1)",
               "batch_size": "examples per device per micro-batch (default: the task's recipe, else 4)"}
EVAL_HELP = """Score a model on a task:
  summarize  ROUGE on JSONL rows with fields "document" (input) and "summary" (reference);
             other names with --input-field / --target-field
  translate  BLEU and chrF on JSONL rows with one field per language code, e.g. {"en": ..., "es": ...}
             (--from en --to es; other names with --input-field / --target-field)
  qa         exact match and F1 on a SQuAD v1.1 JSON file (a `qa train` run dir, or an instruct model)
A row that lacks a field fails in one line naming the file, line and field.
A long input is cut to its first and last tokens, as fine-tuning cuts it: to the prompt length a fine-tuned run
dir was trained with, else to the context length less --max-new-tokens (--max-prompt-tokens sets it); stderr
says so once.
Every output is checked against its source: `unsupported%` is the share of outputs with a number, amount, year,
century or capitalised name (names not for translate) that the source does not contain.
--quantize auto (the default) decodes a quantized GGUF file quantized, as `generate` does.

"""


def apply_recipe(a: argparse.Namespace) -> dict:
    """Fill the task flags left at None from the task's recipe, then the generic defaults; return the recipe's
    training settings (for train_config's `late`), so that every flag the user gave wins."""
    from lmforge.tasks.seq2seq import RECIPES

    recipe = dict(RECIPES.get(a.task, {}))
    if a.epochs is not None:  # --epochs given: it replaces the recipe's step budget
        recipe.pop("max_steps", None)
    for name, generic in GENERIC.items():
        if getattr(a, name, None) is None:
            setattr(a, name, recipe.get(name, generic))
    if bool(a.lora) != bool(recipe.get("lora", False)):  # --lora / --no-lora against the recipe: its lr is not for
        recipe.pop("lr", None)                            # the other mode (3e-5 full, 2e-4 LoRA then apply)
    return {k: v for k, v in recipe.items() if k not in FINETUNE_FLAGS and k not in GENERIC}


def cmd_finetune(a: argparse.Namespace) -> int:
    from lmforge.tasks.seq2seq import EVAL_METRICS, FinetuneConfig, finetune

    check_keep_best(a.keep_best, EVAL_METRICS, "finetune")
    main_rank, log = join_workers(a)
    if a.resume:
        task, tc = load_resume(a, "finetune_config.json")
        c = FinetuneConfig(**task)
    else:
        if not a.data:
            raise LmforgeError("finetune: --data FILE is required (JSON lines with input and target fields)")
        recipe = apply_recipe(a)
        c = FinetuneConfig(**pick(a, FINETUNE_FLAGS))
        out = run_dir(a, f"finetune-{c.task}", c.model)
        prepare_run(a, out)
        tc = train_config(a, out, {"lr": 2e-4 if c.lora else 3e-5, **recipe})
    s = finetune(c, tc, resume=bool(a.resume), log=log)
    v = s["validation"]
    if main_rank:
        print(f"run: {s['run_dir']}  steps: {s['steps']} ({s['stopped']}, {s['elapsed_s']}s)  "
              f"validation loss {v.get('eval_loss', float('nan')):.4f} "
              f"perplexity {v.get('perplexity', float('nan')):.2f}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from lmforge.device import resolve_device
    from lmforge.tasks.evaluate import EvalConfig, evaluate_task, format_summary

    resolve_device(a.device, "--device")  # a device this machine lacks: refused before the data is read
    model, *ensemble = a.model
    out = a.predictions or str(Path("runs") / f"eval-{a.task}-{Path(model).name}-{time.strftime(RUN_STAMP)}"
                               / "predictions.jsonl")
    c = EvalConfig(task=a.task, model=model, ensemble=tuple(ensemble), data=a.data, limit=a.limit,
                   input_field=a.input_field, target_field=a.target_field, to=a.to, src=a.src, batch_size=a.batch_size,
                   max_new_tokens=a.max_new_tokens, num_beams=a.num_beams, output=out, tail=a.tail,
                   quantize=a.quantize, shots=a.shots or 0, shots_file=a.shots_file, sentences=a.sentences,
                   device=a.device, max_prompt_tokens=a.max_prompt_tokens, speculative=a.speculative,
                   draft_tokens=a.draft_tokens)
    s = evaluate_task(c, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(s, indent=1) if a.json else format_summary(s))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.tasks.seq2seq import FinetuneConfig

    s = sub.add_parser("finetune", help="fine-tune a decoder on JSONL input/target pairs (prompt masked from loss)",
                       description="Sequence-to-sequence fine-tuning of a decoder: summarization, translation or "
                       "instructions. Loss on target tokens only; full or LoRA. The run dir loads in `generate`, "
                       "the task verbs and transformers.", epilog=RECIPE_HELP)
    add_fields(s, FinetuneConfig, FINETUNE_FLAGS, {k: None for k in GENERIC if k in FINETUNE_FLAGS},
               {"model": "decoder to fine-tune (default: the task's recipe, else smollm2-135m-instruct)"})
    add_train_flags(s, TRAIN_DEFAULTS, TRAIN_HELPS)
    s.set_defaults(func=cmd_finetune)

    from lmforge.tasks.prompts import FEWSHOT_HELP

    s = sub.add_parser("eval", help="score a model on summarize (ROUGE), translate (BLEU/chrF) or qa (EM/F1)",
                       description=EVAL_HELP + FEWSHOT_HELP)
    s.add_argument("--task", required=True, choices=["summarize", "translate", "qa"])
    s.add_argument("--model", default=[DEFAULT_LM], nargs="+", help="instruct model, fine-tuned run dir, QA run "
                   "dir, or lead-3 (summarize baseline); several qa run dirs answer as one ensemble (their span "
                   "logits averaged)")
    s.add_argument("--data", required=True, help="JSONL (summarize/translate) or SQuAD JSON (qa)")
    s.add_argument("--limit", type=positive_int, default=None, help="first N examples (last N with --tail)")
    s.add_argument("--tail", action="store_true", help="take the last N examples")
    s.add_argument("--input-field", default=None, help="input field (default: document; translate: --from)")
    s.add_argument("--target-field", default=None, help="reference field (default: summary; translate: --to)")
    s.add_argument("--to", default=None, help="translate: target language code")
    s.add_argument("--from", dest="src", default=None, help="translate: source language code (default: en)")
    s.add_argument("--shots", type=positive_int, default=None, metavar="K",
                   help="summarize/translate: few-shot prompt with K examples from --shots-file (for base models)")
    s.add_argument("--shots-file", default=None, metavar="FILE",
                   help="JSONL with the same fields as --data; rows evaluated in this run are never shown")
    s.add_argument("--batch-size", type=positive_int, default=None,
                   help="prompts decoded together, left-padded (default 8); qa run dirs: windows per forward (64)")
    s.add_argument("--max-new-tokens", type=positive_int, default=128)
    s.add_argument("--sentences", type=positive_int, default=None, metavar="N",
                   help="summarize: sentence budget stated in the prompt (default: the one a fine-tuned model was "
                   "trained with, else \"two or three\")")
    s.add_argument("--num-beams", type=positive_int, default=1)
    from lmforge.cli.generate import add_speculative_flags

    add_speculative_flags(s)
    s.add_argument("--max-prompt-tokens", type=positive_int, default=None, metavar="N",
                   help="cut longer prompts to their first N/2 and last N/2 tokens, as fine-tuning does (default: "
                   "the prompt length a fine-tuned run dir was trained with, else the context length less "
                   "--max-new-tokens)")
    s.add_argument("--quantize", choices=["auto", "none", "8", "4"], default="auto",
                   help="auto: a quantized GGUF decodes on its int4/int8 path, other models in float; none: float; "
                   "8|4: int8/int4 weights from the floats")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.add_argument("--predictions", default=None, help="predictions JSONL path (summary.json goes beside it; "
                   f"default: runs/eval-<task>-<model>-{STAMP_HELP}/predictions.jsonl)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_eval)
