"""Text generation verbs: generate, chat, summarize, translate, ask.

Each verb has its own decoding defaults, shown in its --help, chosen so that a small model does not loop:
free text gets a repetition penalty and an n-gram ban on its own output; the task verbs ban repeated 4-grams
of the output only (so the answer may still quote its source) and size max_new_tokens to the task.
"""

from __future__ import annotations

import argparse
import sys
import time

from lmforge.cli.common import EPILOG, add_gen_flags, gen_kwargs, load_generator, read_input
from lmforge.errors import LmforgeError

GENERATE_DEFAULTS = {"max_new_tokens": 256, "repetition_penalty": 1.1, "no_repeat_ngram_size": 3}
CHAT_DEFAULTS = {"max_new_tokens": 256, "repetition_penalty": 1.1, "no_repeat_ngram_size": 4}
SUMMARIZE_DEFAULTS = {"max_new_tokens": 160, "no_repeat_ngram_size": 4}
TRANSLATE_DEFAULTS = {"max_new_tokens": None, "no_repeat_ngram_size": 4}  # None: sized to the input
ASK_DEFAULTS = {"max_new_tokens": 64, "no_repeat_ngram_size": 4}


def emit(gen, prompt: str, a: argparse.Namespace, chat: bool, kw: dict | None = None) -> None:
    """Print the reply: piece by piece, flushed (so a pipe sees it as it comes), unless --no-stream or beams;
    --verbose adds the speed line on stderr."""
    kw = dict(kw or gen_kwargs(a))
    t0, first = time.perf_counter(), None
    if a.stream and kw["num_beams"] == 1:
        pieces = []
        for piece in gen.stream(prompt, chat=chat, truncate=a.truncate, **kw):
            first = first or time.perf_counter()
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        text = "".join(pieces)
    else:
        text = gen.generate(prompt, chat=chat, truncate=a.truncate, **kw)
        print(text, flush=True)
    if a.verbose:
        speed_line(gen, prompt, chat, text, t0, first, time.perf_counter())


def speed_line(gen, prompt: str, chat: bool, text: str, t0: float, first: float | None, end: float) -> None:
    """prompt tokens, generated tokens (the reply re-encoded), time to first token and tokens/s, on stderr."""
    tok = gen.tokenizer
    shown = gen.format_chat([{"role": "user", "content": prompt}]) if chat else prompt
    n_prompt = len(tok.encode(shown, add_special_tokens=not chat))
    n_gen = len(tok.encode(text, add_special_tokens=False)) if text else 0
    ttft = f"{first - t0:.2f}s" if first is not None else "-"
    decode = f", decode {(n_gen - 1) / (end - first):.1f} tokens/s" if first is not None and n_gen > 1 else ""
    print(f"prompt {n_prompt} tokens, generated {n_gen} tokens, time to first token {ttft}, "
          f"{n_gen / max(end - t0, 1e-9):.1f} tokens/s overall{decode}, {end - t0:.2f}s", file=sys.stderr)


def cmd_generate(a: argparse.Namespace) -> int:
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise LmforgeError("generate: empty prompt (pass --prompt TEXT or text on stdin)")
    gen_kwargs(a)  # bad flags fail before the model loads
    emit(load_generator(a.model, a.quantize), prompt, a, chat=a.chat)
    return 0


def cmd_summarize(a: argparse.Namespace) -> int:
    from lmforge.tasks.prompts import summarize_prompt

    text = read_input(a.file, "input")
    gen_kwargs(a)
    emit(load_generator(a.model, a.quantize), summarize_prompt(text), a, chat=True)
    return 0


def cmd_translate(a: argparse.Namespace) -> int:
    from lmforge.tasks.prompts import language_name, translate_prompt

    language_name(a.to, "--to")
    if a.src:
        language_name(a.src, "--from")
    text = read_input(a.file, "input")
    kw = gen_kwargs(a) if a.max_new_tokens else None
    gen = load_generator(a.model, a.quantize)
    if kw is None:  # sized to the input: a translation runs about as long as its source
        a.max_new_tokens = 2 * len(gen.tokenizer.encode(text, add_special_tokens=False)) + 16
        kw = gen_kwargs(a)
    emit(gen, translate_prompt(text, a.to, a.src), a, chat=True, kw=kw)
    return 0


def cmd_ask(a: argparse.Namespace) -> int:
    from lmforge.tasks.prompts import answer_prompt

    context = read_input(a.context, "context")
    if not a.question.strip():
        raise LmforgeError("ask: empty question")
    gen_kwargs(a)
    emit(load_generator(a.model, a.quantize), answer_prompt(context, a.question), a, chat=True)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    kw = gen_kwargs(a)
    gen = load_generator(a.model, a.quantize)
    history: list[dict[str, str]] = [{"role": "system", "content": a.system}] if a.system else []
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
        for piece in gen.chat_stream(history, **kw):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("generate", help="continue a prompt (streams as it decodes)", epilog=EPILOG)
    s.add_argument("--prompt", default=None, help="prompt text (default: stdin)")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_gen_flags(s, GENERATE_DEFAULTS)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive chat with the model's chat template (/reset, /exit)",
                       epilog=EPILOG)
    s.add_argument("--system", default=None, help="system message")
    add_gen_flags(s, CHAT_DEFAULTS)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("summarize", help="summarize a text file (or stdin) with an instruct model", epilog=EPILOG)
    s.add_argument("file", nargs="?", default=None, metavar="FILE|-")
    add_gen_flags(s, SUMMARIZE_DEFAULTS)
    s.set_defaults(func=cmd_summarize)

    s = sub.add_parser("translate", help="translate a text file (or stdin) with an instruct model", epilog=EPILOG)
    s.add_argument("file", nargs="?", default=None, metavar="FILE|-")
    s.add_argument("--to", required=True, help="target language (ISO 639-1 code, e.g. es)")
    s.add_argument("--from", dest="src", default=None, help="source language code (optional)")
    add_gen_flags(s, TRANSLATE_DEFAULTS, {"max_new_tokens": "tokens to generate at most (default: twice the "
                                                            "input's tokens + 16)"})
    s.set_defaults(func=cmd_translate)

    s = sub.add_parser("ask", help="answer a question from a context file with an instruct model", epilog=EPILOG)
    s.add_argument("question", metavar="QUESTION")
    s.add_argument("--context", required=True, metavar="FILE", help="text file the answer must come from")
    add_gen_flags(s, ASK_DEFAULTS)
    s.set_defaults(func=cmd_ask)
