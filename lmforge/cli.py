"""`lmforge VERB ...`: parses flags and calls one function per verb; user errors exit 2 with one line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from lmforge.errors import LmforgeError

EPILOG = """models: a built-in name (minilm-l6, smollm2-135m-instruct, gemma3-270m), a Hugging Face
directory (config.json + safetensors), a .gguf file, or a hub id (fetched when the network allows)."""


# ---- info ------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from lmforge.api import load_full

    ck = load_full(args.model)
    cfg, model = ck.cfg, ck.model
    info = {
        "model": args.model,
        "family": cfg.family,
        "parameters": model.num_parameters(),
        "layers": cfg.n_layers,
        "width": cfg.d_model,
        "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "mlp": f"{cfg.mlp} ({cfg.d_ff})",
        "vocab": cfg.vocab_size,
        "context_length": cfg.context_length,
        "attention": "causal" if cfg.causal else "bidirectional",
        "position": cfg.position + (f" (theta {cfg.rope_theta:g})" if cfg.position == "rotary" else ""),
        "stored_dtype": ck.quantization or cfg.dtype,
        "loaded_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "format": ck.format,
        "file_size": ck.file_size,
        "path": str(ck.path),
        "source": ck.source,
        "tokenizer": ck.tokenizer is not None,
    }
    if cfg.id2label:
        info["labels"] = [cfg.id2label[i] for i in sorted(cfg.id2label)]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "parameters":
            v = f"{v:,} ({v / 1e6:.1f}M)"
        elif k == "file_size":
            v = f"{v:,} bytes ({v / 2**20:.1f} MiB)"
        print(f"{k:<{width}}  {v}")
    return 0


# ---- embed -----------------------------------------------------------------------------------------
def cmd_embed(args: argparse.Namespace) -> int:
    from lmforge.api import embed_texts, load

    texts = args.text or [line.rstrip("\n") for line in sys.stdin]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LmforgeError("embed: no text given (pass TEXT arguments or lines on stdin)")
    model, tok = load(args.model)
    vecs = embed_texts(model, tok, texts, batch_size=args.batch_size, normalize=args.normalize)
    out = sys.stdout
    for v in vecs.tolist():
        out.write(json.dumps([round(x, 7) for x in v]) + "\n")
    return 0


# ---- parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmforge", description="Build language-understanding systems on pretrained Transformers.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from lmforge import __version__

    p.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    s = sub.add_parser("info", help="describe a model: family, size, shapes, where it was loaded from",
                       epilog=EPILOG)
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("embed", help="sentence embeddings (mean pooling), one JSON array per line",
                       epilog=EPILOG)
    s.add_argument("model", metavar="MODEL")
    s.add_argument("text", nargs="*", metavar="TEXT", help="texts to embed (default: stdin, one per line)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    s.set_defaults(func=cmd_embed)

    for register in _EXTRA_VERBS:
        register(sub)
    return p


# Other modules add verbs here (classify, generate, ...) so this file stays a thin map.
_EXTRA_VERBS: list[Callable[[argparse._SubParsersAction], None]] = []


# ---- generation ------------------------------------------------------------------------------------
DEFAULT_LM = "smollm2-135m-instruct"


def _add_gen_flags(s: argparse.ArgumentParser, max_new: int = 256) -> None:
    s.add_argument("--model", default=DEFAULT_LM, help=f"model to use (default: {DEFAULT_LM})")
    g = s.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--quantize", type=int, choices=[8, 4], default=None,
                   help="weight-only int8/int4 matmuls for faster CPU decoding")
    g.add_argument("--truncate", action="store_true",
                   help="keep the last tokens of a prompt that is too long instead of failing")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they come (default: when stdout is a terminal)")


def _gen_kwargs(a: argparse.Namespace) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repetition_penalty=a.repetition_penalty, num_beams=a.num_beams,
                length_penalty=a.length_penalty, stop_strings=a.stop, seed=a.seed)


def _generator(a: argparse.Namespace):
    from lmforge.api import Generator
    from lmforge.generate import GenerationConfig

    GenerationConfig(**_gen_kwargs(a)).validate()  # bad flags fail before the model loads
    return Generator.load(a.model, quantize=a.quantize)


def _emit(gen, prompt: str, a: argparse.Namespace, chat: bool) -> None:
    stream = sys.stdout.isatty() if a.stream is None else a.stream
    kw = dict(chat=chat, truncate=a.truncate, **_gen_kwargs(a))
    if stream and a.num_beams == 1:
        for piece in gen.stream(prompt, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(gen.generate(prompt, **kw))


def _read_input(path: str | None, what: str) -> str:
    from pathlib import Path

    if path in (None, "-"):
        text = sys.stdin.read()
    else:
        p = Path(path)
        if not p.is_file():
            raise LmforgeError(f"{p}: {what} file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LmforgeError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise LmforgeError(f"{path or 'stdin'}: empty {what}")
    return text


def cmd_generate(a: argparse.Namespace) -> int:
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise LmforgeError("generate: empty prompt (pass --prompt TEXT or text on stdin)")
    gen = _generator(a)
    _emit(gen, prompt, a, chat=a.chat)
    return 0


def cmd_summarize(a: argparse.Namespace) -> int:
    from lmforge.tasks.prompts import summarize_prompt

    text = _read_input(a.file, "input")
    _emit(_generator(a), summarize_prompt(text), a, chat=True)
    return 0


def cmd_translate(a: argparse.Namespace) -> int:
    from lmforge.tasks.prompts import language_name, translate_prompt

    language_name(a.to, "--to")
    if a.src:
        language_name(a.src, "--from")
    text = _read_input(a.file, "input")
    _emit(_generator(a), translate_prompt(text, a.to, a.src), a, chat=True)
    return 0


def cmd_ask(a: argparse.Namespace) -> int:
    from lmforge.tasks.prompts import answer_prompt

    context = _read_input(a.context, "context")
    if not a.question.strip():
        raise LmforgeError("ask: empty question")
    _emit(_generator(a), answer_prompt(context, a.question), a, chat=True)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    gen = _generator(a)
    history: list[dict[str, str]] = []
    if a.system:
        history.append({"role": "system", "content": a.system})
    print(f"chatting with {a.model}; /reset clears the history, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history = history[:1] if a.system else []
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        reply = []
        for piece in gen.chat_stream(history, **_gen_kwargs(a)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def _register_generation(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("generate", help="continue a prompt (streams on a terminal)", epilog=EPILOG)
    s.add_argument("--prompt", default=None, help="prompt text (default: stdin)")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_gen_flags(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive chat with the model's chat template (/reset, /exit)")
    s.add_argument("--system", default=None, help="system message")
    _add_gen_flags(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("summarize", help="summarize a text file (or stdin) with an instruct model")
    s.add_argument("file", nargs="?", default=None, metavar="FILE|-")
    _add_gen_flags(s, max_new=160)
    s.set_defaults(func=cmd_summarize)

    s = sub.add_parser("translate", help="translate a text file (or stdin) with an instruct model")
    s.add_argument("file", nargs="?", default=None, metavar="FILE|-")
    s.add_argument("--to", required=True, help="target language (ISO 639-1 code, e.g. es)")
    s.add_argument("--from", dest="src", default=None, help="source language code (optional)")
    _add_gen_flags(s)
    s.set_defaults(func=cmd_translate)

    s = sub.add_parser("ask", help="answer a question from a context file with an instruct model")
    s.add_argument("question", metavar="QUESTION")
    s.add_argument("--context", required=True, metavar="FILE", help="text file the answer must come from")
    _add_gen_flags(s, max_new=64)
    s.set_defaults(func=cmd_ask)


_EXTRA_VERBS.append(_register_generation)


# ---- classification --------------------------------------------------------------------------------
def _train_config(a: argparse.Namespace, out: str, defaults: dict):
    from lmforge.train import TrainConfig

    def pick(name: str):
        v = getattr(a, name)
        return defaults.get(name) if v is None else v

    return TrainConfig(
        output_dir=out, epochs=pick("epochs"), max_steps=a.max_steps, batch_size=pick("batch_size"),
        grad_accum=a.grad_accum, lr=pick("lr"), weight_decay=a.weight_decay, schedule=a.schedule,
        warmup=pick("warmup"), max_grad_norm=a.max_grad_norm, eval_every=pick("eval_every"),
        save_every=pick("save_every"), keep_best=a.keep_best or defaults.get("keep_best"),
        early_stopping_patience=a.early_stopping, seed=a.seed, bf16=a.bf16, compile=a.compile,
        device=a.device, max_time_s=a.max_time, overwrite=a.overwrite, progress=not a.no_progress,
        log_every=a.log_every)


def _add_train_flags(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("training")
    g.add_argument("--output", "-o", default=None, help="run directory (default: runs/<task>-<model>-<time>)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its "
                   "latest checkpoint, with the settings it was started with")
    g.add_argument("--epochs", type=float, default=None)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    g.add_argument("--warmup", type=float, default=None, help="< 1: fraction of steps; >= 1: steps")
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (0: at the end)")
    g.add_argument("--save-every", type=int, default=None, help="steps between checkpoints")
    g.add_argument("--keep-best", default=None, metavar="METRIC", help="keep the best model by this eval metric")
    g.add_argument("--early-stopping", type=int, default=None, metavar="N",
                   help="stop after N evaluations without improvement of --keep-best")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA, or CPUs with bf16)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--max-time", type=float, default=None, metavar="SECONDS",
                   help="stop cleanly after this long (checkpoint saved; --resume continues)")
    g.add_argument("--overwrite", action="store_true", help="start over in a run dir that has checkpoints")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_dir(a: argparse.Namespace, task: str, model: str) -> str:
    if a.output:
        return a.output
    import time as _time
    from pathlib import Path

    from lmforge.distributed import broadcast_from_leader

    slug = Path(model).name.replace("/", "_") or "model"
    # under torchrun the ranks may read the clock a second apart: all use rank 0's name
    return broadcast_from_leader(str(Path("runs") / f"{task}-{slug}-{_time.strftime('%Y%m%d-%H%M%S')}"))


def _join_workers(a: argparse.Namespace):
    """Join torchrun's process group when launched by it (a no-op otherwise), for the training verbs.

    -> (is_main, log): only rank 0 prints; the Trainer shards batches, syncs gradients (DDP) and lets rank 0
    alone write files."""
    from lmforge.distributed import init_distributed

    main_rank = init_distributed(a.device).is_main
    return main_rank, ((lambda m: print(m, file=sys.stderr)) if main_rank else (lambda m: None))


def _load_resume(a: argparse.Namespace, config_name: str):
    """For --resume: the task and trainer configs the run was started with."""
    from pathlib import Path

    from lmforge.errors import TrainingError
    from lmforge.train import TrainConfig, list_checkpoints

    run = Path(a.resume)
    if not run.is_dir():
        raise TrainingError(f"{run}: --resume: no such run directory")
    if not list_checkpoints(run):
        raise TrainingError(f"{run}: no checkpoint to resume from (expected {run}/checkpoints/step-N)")
    try:
        task = json.loads((run / config_name).read_text())
        tc = json.loads((run / "trainer_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"{run}: cannot read the run's saved configs ({e})") from None
    names = set(TrainConfig.__dataclass_fields__)
    tcfg = TrainConfig.from_dict({k: v for k, v in tc.items() if k in names})
    if a.max_time is not None:
        tcfg.max_time_s = a.max_time
    tcfg.progress = not a.no_progress
    return task, tcfg


def cmd_classify_train(a: argparse.Namespace) -> int:
    from lmforge.tasks.classify import GLOVE, ClassifyConfig, train

    main_rank, log = _join_workers(a)
    if a.resume:
        task, tc = _load_resume(a, "classify_config.json")
        c = ClassifyConfig(**task)
    else:
        c = ClassifyConfig(
            model=a.model, data=a.data, eval_data=a.eval_data, text_column=a.text_column,
            text_pair_column=a.text_pair_column, label_column=a.label_column, encoding=a.encoding,
            strict=a.strict, max_length=a.max_length, pooling=a.pooling, padding_side=a.padding_side,
            max_train_samples=a.max_train_samples, max_eval_samples=a.max_eval_samples, lora=a.lora,
            lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
            lora_targets=a.lora_targets, save_adapters_only=a.save_adapters_only)
        glove = c.model == GLOVE
        defaults = {"epochs": 5.0 if glove else 1.0, "batch_size": 64 if glove else 32,
                    "lr": 1e-3 if glove or c.lora else 5e-5, "warmup": 0.1,
                    "eval_every": 100, "save_every": 100, "keep_best": "accuracy"}
        tc = _train_config(a, _run_dir(a, "classify", c.model), defaults)
    summary = train(c, tc, resume=bool(a.resume), log=log)
    v = summary["validation"]
    if main_rank:
        print(f"run: {summary['run_dir']}  steps: {summary['steps']} ({summary['stopped']}, {summary['elapsed_s']}s)  "
              f"validation accuracy {v.get('accuracy', float('nan')):.4f} "
              f"macro-F1 {v.get('macro_f1', float('nan')):.4f}")
    return 0


def cmd_classify_eval(a: argparse.Namespace) -> int:
    from pathlib import Path

    from lmforge.metrics import format_report, plot_confusion_matrix
    from lmforge.tasks.classify import ClassifyConfig, evaluate, load_classifier, load_eval_examples

    lc = load_classifier(a.model)
    c = ClassifyConfig(text_column=a.text_column, text_pair_column=a.text_pair_column, label_column=a.label_column,
                       encoding=a.encoding, strict=a.strict)
    examples = load_eval_examples(a.data, c, a.limit)
    rep = evaluate(lc, examples, a.batch_size)
    out_dir = Path(a.model)
    png = Path(a.plot) if a.plot else out_dir / "confusion_matrix.png"
    try:
        plot_confusion_matrix(rep, png, title=f"{Path(a.model).name} on {Path(a.data).name}")
        rep["confusion_matrix_png"] = str(png)
    except OSError:
        pass
    if a.json:
        print(json.dumps(rep, indent=1))
    else:
        print(format_report(rep))
        print(f"\n{rep['examples']} examples, {rep['samples_per_s']} samples/s; confusion matrix: {png}")
    return 0


def cmd_classify_predict(a: argparse.Namespace) -> int:
    from lmforge.tasks.classify import load_classifier, predict

    texts = a.text or [line.rstrip("\n") for line in sys.stdin]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LmforgeError("classify predict: no text given (pass TEXT arguments or lines on stdin)")
    lc = load_classifier(a.model)
    for t, r in zip(texts, predict(lc, texts, a.batch_size)):
        print(json.dumps({"text": t, **r}, ensure_ascii=False))
    return 0


def _add_data_flags(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("data")
    g.add_argument("--text-column", default="text")
    g.add_argument("--text-pair-column", default=None, help="second text (sentence pairs)")
    g.add_argument("--label-column", default="label")
    g.add_argument("--encoding", default=None, help="file encoding (default utf-8), e.g. latin-1")
    g.add_argument("--strict", action="store_true", help="fail on empty text rows instead of skipping them")


def _register_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="fine-tune, evaluate and use text classifiers")
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    s = csub.add_parser("train", help="fine-tune a classifier (defaults: minilm-l6 on tweets-sentiment, ~5 min)",
                        description="Fine-tune a pretrained model (or GloVe vectors) for text classification. "
                        "DATA is a built-in dataset (tweets-sentiment, bbc-news) or a CSV/TSV/JSONL file.")
    s.add_argument("--model", default="minilm-l6", help="minilm-l6 | smollm2-135m-instruct | glove-6b-50d | "
                   "a HF dir / GGUF / hub id (default: minilm-l6)")
    s.add_argument("--data", default="tweets-sentiment", help="built-in dataset or file (default: tweets-sentiment)")
    s.add_argument("--eval-data", default=None, help="validation file (default: a stratified split of --data)")
    _add_data_flags(s)
    g = s.add_argument_group("model")
    g.add_argument("--max-length", type=int, default=64, help="tokens per text (default 64)")
    g.add_argument("--pooling", choices=["last", "cls", "mean"], default=None,
                   help="default: last non-pad token for decoders, cls for encoders")
    g.add_argument("--padding-side", choices=["right", "left"], default="right")
    g.add_argument("--max-train-samples", type=int, default=8000,
                   help="subsample the training set (default 8000, the ~5-minute budget; 0 = all)")
    g.add_argument("--max-eval-samples", type=int, default=1000)
    g.add_argument("--lora", action="store_true",
                   help="train LoRA adapters + the head only (default recipe: rank 16 on every linear, lr 1e-3)")
    g.add_argument("--lora-rank", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="all-linear",
                   help="comma list of q,k,v,o,gate,up,down,fc1,fc2, or all-linear (default)")
    g.add_argument("--save-adapters-only", action="store_true", help="LoRA: save adapters, not a merged model")
    _add_train_flags(s)
    s.set_defaults(func=cmd_classify_train)

    s = csub.add_parser("eval", help="accuracy, macro-F1, per-class precision/recall, confusion matrix")
    s.add_argument("--model", required=True, metavar="RUN_DIR")
    s.add_argument("--data", required=True, help="built-in dataset (its test split) or a labelled file")
    s.add_argument("--limit", type=int, default=None, help="evaluate on the first N (class-balanced) examples")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--json", action="store_true")
    s.add_argument("--plot", default=None, help="confusion-matrix PNG path (default: RUN_DIR/confusion_matrix.png)")
    _add_data_flags(s)
    s.set_defaults(func=cmd_classify_eval)

    s = csub.add_parser("predict", help="label texts (args or stdin lines): JSONL with label and probabilities")
    s.add_argument("--model", required=True, metavar="RUN_DIR")
    s.add_argument("text", nargs="*", metavar="TEXT")
    s.add_argument("--batch-size", type=int, default=64)
    s.set_defaults(func=cmd_classify_predict)


_EXTRA_VERBS.append(_register_classify)


# ---- seq2seq fine-tuning and task evaluation ------------------------------------------------------
def cmd_finetune(a: argparse.Namespace) -> int:
    from lmforge.tasks.seq2seq import FinetuneConfig, finetune

    main_rank, log = _join_workers(a)
    if a.resume:
        task, tc = _load_resume(a, "finetune_config.json")
        c = FinetuneConfig(**task)
    else:
        if not a.data:
            raise LmforgeError("finetune: --data FILE is required (JSON lines with input and target fields)")
        c = FinetuneConfig(
            model=a.model, task=a.task, data=a.data, eval_data=a.eval_data, input_field=a.input_field,
            target_field=a.target_field, to=a.to, src=a.src, max_length=a.max_length,
            max_target_length=a.max_target_length, max_train_samples=a.max_train_samples,
            max_eval_samples=a.max_eval_samples, lora=a.lora, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha,
            lora_dropout=a.lora_dropout, lora_targets=a.lora_targets, save_adapters_only=a.save_adapters_only)
        defaults = {"epochs": 1.0, "batch_size": 4, "lr": 2e-4 if c.lora else 3e-5, "warmup": 0.05,
                    "eval_every": 100, "save_every": 100, "keep_best": "eval_loss"}
        tc = _train_config(a, _run_dir(a, f"finetune-{c.task}", c.model), defaults)
    s = finetune(c, tc, resume=bool(a.resume), log=log)
    v = s["validation"]
    if main_rank:
        print(f"run: {s['run_dir']}  steps: {s['steps']} ({s['stopped']}, {s['elapsed_s']}s)  "
              f"validation loss {v.get('eval_loss', float('nan')):.4f} "
              f"perplexity {v.get('perplexity', float('nan')):.2f}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from lmforge.tasks.evaluate import EvalConfig, evaluate_task, format_summary

    c = EvalConfig(task=a.task, model=a.model, data=a.data, limit=a.limit, input_field=a.input_field,
                   target_field=a.target_field, to=a.to, src=a.src, batch_size=a.batch_size,
                   max_new_tokens=a.max_new_tokens, num_beams=a.num_beams, output=a.predictions, tail=a.tail,
                   quantize=a.quantize)
    s = evaluate_task(c, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(s, indent=1) if a.json else format_summary(s))
    return 0


def _register_seq2seq(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("finetune", help="fine-tune a decoder on JSONL input/target pairs (prompt masked from loss)",
                       description="Sequence-to-sequence fine-tuning of a decoder: summarization, translation or "
                       "instructions. Loss on target tokens only; full or LoRA. The run dir loads in `generate`, "
                       "the task verbs and transformers.")
    s.add_argument("--task", choices=["summarize", "translate", "instruct"], default="instruct")
    s.add_argument("--model", default=DEFAULT_LM)
    s.add_argument("--data", default=None, help="JSONL training file")
    s.add_argument("--eval-data", default=None, help="JSONL validation file (default: the last 5%% of --data)")
    s.add_argument("--input-field", default="input")
    s.add_argument("--target-field", default="target")
    s.add_argument("--to", default=None, help="translate: target language code")
    s.add_argument("--from", dest="src", default=None, help="translate: source language code")
    s.add_argument("--max-length", type=int, default=512, help="prompt + target tokens")
    s.add_argument("--max-target-length", type=int, default=256)
    s.add_argument("--max-train-samples", type=int, default=None)
    s.add_argument("--max-eval-samples", type=int, default=200)
    s.add_argument("--lora", action="store_true")
    s.add_argument("--lora-rank", type=int, default=8)
    s.add_argument("--lora-alpha", type=float, default=16.0)
    s.add_argument("--lora-dropout", type=float, default=0.0)
    s.add_argument("--lora-targets", default="q,v")
    s.add_argument("--save-adapters-only", action="store_true")
    _add_train_flags(s)
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("eval", help="score a model on summarize (ROUGE), translate (BLEU/chrF) or qa (EM/F1)")
    s.add_argument("--task", required=True, choices=["summarize", "translate", "qa"])
    s.add_argument("--model", default=DEFAULT_LM, help="instruct model, fine-tuned run dir, QA run dir, or "
                   "lead-3 (summarize baseline)")
    s.add_argument("--data", required=True, help="JSONL (summarize/translate) or SQuAD JSON (qa)")
    s.add_argument("--limit", type=int, default=None, help="first N examples (last N with --tail)")
    s.add_argument("--tail", action="store_true")
    s.add_argument("--input-field", default=None)
    s.add_argument("--target-field", default=None)
    s.add_argument("--to", default=None)
    s.add_argument("--from", dest="src", default=None)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--num-beams", type=int, default=1)
    s.add_argument("--quantize", type=int, choices=[8, 4], default=None)
    s.add_argument("--predictions", default=None, help="predictions JSONL path (summary.json goes beside it)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_eval)


_EXTRA_VERBS.append(_register_seq2seq)


def _register_modules(sub: argparse._SubParsersAction) -> None:
    """Verbs that live in their own small modules: qa, tokenizer + pretrain, serve."""
    from lmforge import cli_pretrain, cli_qa, cli_serve

    for mod in (cli_qa, cli_pretrain, cli_serve):
        mod.register(sub)


_EXTRA_VERBS.append(_register_modules)


def main(argv: list[str] | None = None) -> int:
    return run_args(build_parser().parse_args(argv))


def run_args(args: argparse.Namespace) -> int:
    """Run a parsed verb: an LmforgeError becomes one line on stderr and exit status 2, never a traceback."""
    try:
        return int(args.func(args) or 0)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
