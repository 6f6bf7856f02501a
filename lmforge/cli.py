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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
