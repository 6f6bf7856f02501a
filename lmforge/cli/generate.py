"""Text generation verbs: generate, chat, summarize, translate, ask.

Each verb has its own decoding defaults, shown in its --help, chosen so that a small model does not loop:
free text gets a repetition penalty and an n-gram ban on its own output; the task verbs ban repeated 4-grams
of the output only (so the answer may still quote its source) and size max_new_tokens to the task.
The task verbs take several inputs (decoded in batches), warn on stderr about numbers, amounts and names that
the source lacks (tasks/grounding.py), and summarize/translate prompt base models few-shot with --shots.
"""

from __future__ import annotations

import argparse
import sys
import time

from lmforge.cli.common import EPILOG, add_gen_flags, gen_kwargs, load_generator, positive_int, read_input
from lmforge.errors import LmforgeError

GENERATE_DEFAULTS = {"max_new_tokens": 256, "repetition_penalty": 1.1, "no_repeat_ngram_size": 3}
CHAT_DEFAULTS = {"max_new_tokens": 256, "repetition_penalty": 1.1, "no_repeat_ngram_size": 4}
SUMMARIZE_DEFAULTS = {"max_new_tokens": 160, "no_repeat_ngram_size": 4}
TRANSLATE_DEFAULTS = {"max_new_tokens": None, "no_repeat_ngram_size": 4}  # None: sized to the input
ASK_DEFAULTS = {"max_new_tokens": 64, "no_repeat_ngram_size": 4}


def emit(gen, prompt: str, a: argparse.Namespace, chat: bool, kw: dict | None = None) -> str:
    """Print the reply (and return it): piece by piece, flushed (so a pipe sees it as it comes), unless
    --no-stream or beams; --verbose adds the speed line on stderr."""
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
        if (step := getattr(gen, "decode_step", None)) is not None:  # a Generator's (tests pass stand-ins)
            print(f"decode step: {step}", file=sys.stderr)
        spec = getattr(gen, "last_speculative", None)
        if spec is not None and spec.summary() not in str(step):  # streamed: the path was read before the end
            print(spec.summary(), file=sys.stderr)
    return text


def speed_line(gen, prompt: str, chat: bool, text: str, t0: float, first: float | None, end: float) -> None:
    """prompt tokens, generated tokens (the reply re-encoded), time to first token and tokens/s, on stderr."""
    tok = gen.tokenizer
    shown = gen.format_chat([{"role": "user", "content": prompt}]) if chat else prompt
    n_prompt = len(tok.encode(shown, add_special_tokens=not chat))
    n_gen = len(tok.encode(text, add_special_tokens=False)) if text else 0
    ttft = f"{first - t0:.2f}s" if first is not None else "-"
    decode = f", decode {(n_gen - 1) / (end - first):.1f} tokens/s" if first is not None and n_gen > 1 else ""
    print(f"prompt {n_prompt} tokens, generated {n_gen} tokens, time to first token {ttft}, "
          f"{n_gen / max(end - t0, 1e-9):.1f} tokens/s overall{decode}, {end - t0:.2f}s ({gen.runs_on})",
          file=sys.stderr)


def cmd_generate(a: argparse.Namespace) -> int:
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise LmforgeError("generate: empty prompt (pass --prompt TEXT or text on stdin)")
    from lmforge.cli.structured import check_complete, with_constraint

    kw = with_constraint(a, gen_kwargs(a), GENERATE_DEFAULTS)  # bad flags and files fail before the model loads
    gen = load_generator(a.model, a.quantize, a.dtype, a.device)
    gen.compile = a.compile_decode
    speculate(gen, a)
    emit(gen, prompt, a, chat=a.chat, kw=kw)
    check_complete(gen, kw)
    return 0


def read_inputs(files: list[str] | None) -> tuple[list[str], list[str]]:
    """(texts, labels) of FILE arguments, or of stdin when there are none."""
    files = files or ["-"]
    return [read_input(f, "input") for f in files], ["stdin" if f == "-" else f for f in files]


def fewshot_from_flags(a: argparse.Namespace, task: str, inputs: list[str]):
    """The FewShot of --shots/--shots-file/--shots-fields, or None; bad flags or files fail in one line."""
    from lmforge.tasks.prompts import load_fewshot

    if not a.shots and not a.shots_file:
        return None
    if not (a.shots and a.shots_file):
        raise LmforgeError(f"{task}: --shots K and --shots-file FILE go together")
    if a.shots_fields:
        fields = [f.strip() for f in a.shots_fields.split(",")]
        if len(fields) != 2 or not all(fields):
            raise LmforgeError(f"--shots-fields: expected IN,OUT (two field names), got {a.shots_fields!r}")
    elif task == "summarize":
        fields = ["document", "summary"]
    elif not a.src:
        raise LmforgeError("translate --shots: give --from LANG (the input field of --shots-file) or "
                           "--shots-fields IN,OUT")
    else:
        fields = [a.src, a.to]
    return load_fewshot(a.shots_file, a.shots, task, fields[0], fields[1], to=getattr(a, "to", None),
                        src=getattr(a, "src", None), exclude=inputs)


def run_task_verb(gen, a: argparse.Namespace, task: str, sources: list[str], prompts: list[str],
                  labels: list[str], kw: dict, fewshot=None) -> None:
    """One input streams as `generate` does; several are decoded --batch-size at a time (left-padded, longest
    first, a progress bar with an ETA on stderr) and printed in input order under `==> LABEL <==`, each as soon
    as the inputs before it are done; Ctrl-C prints every finished output before it stops. Unless --no-check,
    each output whose numbers, amounts or names are not in its source gets a warning line on stderr."""
    from lmforge.tasks.grounding import check, warning_line
    from lmforge.tasks.textgen import cut_prompts, prompt_cut, run_prompts

    speculate(gen, a)
    if len(prompts) == 1:
        if fewshot is not None:
            kw = {**kw, "stop_strings": [*(kw.get("stop_strings") or []), *fewshot.stop_strings]}
        prompt, chat = prompts[0], fewshot is None
        cut = prompt_cut(gen, max_new_tokens=kw.get("max_new_tokens"), max_prompt_tokens=a.max_prompt_tokens,
                         truncate=a.truncate)
        if cut is not None:  # cut as fine-tuning cuts (a fine-tuned run dir: to the length it was trained with)
            [prompt], chat, special = cut_prompts(gen, [prompt], cut, chat, task)
            kw = kw if special is None else {**kw, "add_special_tokens": special}
        text = emit(gen, prompt, a, chat=chat, kw=kw).strip()
        if a.check and (items := check(sources[0], text, task)):
            print(warning_line(items), file=sys.stderr)
        return
    ready: dict[int, object] = {}  # finished outputs not printed yet
    shown = [0]  # outputs 0 .. shown-1 are printed

    def show(i: int) -> None:
        o = ready.pop(i)
        print(f"==> {labels[i]} <==\n{o.text}\n", flush=True)
        if a.check and o.unsupported:
            print(f"{labels[i]}: {warning_line(o.unsupported)}", file=sys.stderr)

    def finished(i: int, o) -> None:  # print in input order as soon as every earlier input is done
        ready[i] = o
        while shown[0] in ready:
            show(shown[0])
            shown[0] += 1

    try:
        run_prompts(gen, task, sources, prompts, fewshot=fewshot, batch_size=a.batch_size, progress=True,
                    truncate=a.truncate, max_prompt_tokens=a.max_prompt_tokens, on_output=finished, **kw)
    except KeyboardInterrupt:  # what is finished is printed, never lost
        n_done = shown[0] + len(ready)
        for i in sorted(ready):
            show(i)
        print(f"{task}: interrupted; {n_done} of {len(prompts)} outputs printed (the rest were not decoded)",
              file=sys.stderr)
        raise


def cmd_summarize(a: argparse.Namespace) -> int:
    from lmforge.tasks.prompts import summarize_prompt

    texts, labels = read_inputs(a.file)
    kw = gen_kwargs(a)
    shots = fewshot_from_flags(a, "summarize", texts)
    gen = load_generator(a.model, a.quantize, a.dtype, a.device)
    from lmforge.tasks.seq2seq import sentence_budget

    a.sentences = sentence_budget(a.sentences, a.model)  # a fine-tuned run dir: the budget it was trained with
    prompts = [shots.prompt(t) if shots else summarize_prompt(t, a.sentences) for t in texts]
    run_task_verb(gen, a, "summarize", texts, prompts, labels, kw, shots)
    return 0


def cmd_translate(a: argparse.Namespace) -> int:
    from lmforge.tasks.prompts import language_name, translate_prompt

    language_name(a.to, "--to")
    if a.src:
        language_name(a.src, "--from")
    texts, labels = read_inputs(a.file)
    kw = gen_kwargs(a) if a.max_new_tokens else None
    shots = fewshot_from_flags(a, "translate", texts)
    gen = load_generator(a.model, a.quantize, a.dtype, a.device)
    if kw is None:  # sized to the input: a translation runs about as long as its source
        a.max_new_tokens = 2 * max(len(gen.tokenizer.encode(t, add_special_tokens=False)) for t in texts) + 16
        kw = gen_kwargs(a)
    prompts = [shots.prompt(t) if shots else translate_prompt(t, a.to, a.src) for t in texts]
    run_task_verb(gen, a, "translate", texts, prompts, labels, kw, shots)
    return 0


def cmd_ask(a: argparse.Namespace) -> int:
    from lmforge.tasks.prompts import answer_prompt

    context = read_input(a.context, "context")
    if any(not q.strip() for q in a.question):
        raise LmforgeError("ask: empty question")
    kw = gen_kwargs(a)
    gen = load_generator(a.model, a.quantize, a.dtype, a.device)
    prompts = [answer_prompt(context, q) for q in a.question]
    run_task_verb(gen, a, "answer", [context] * len(prompts), prompts, a.question, kw)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    kw = gen_kwargs(a)
    gen = load_generator(a.model, a.quantize, a.dtype, a.device)
    gen.compile = a.compile_decode
    speculate(gen, a)
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
    add_compile_flag(s)
    add_speculative_flags(s, draft=True)
    from lmforge.cli.structured import add_constraint_flags

    add_constraint_flags(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive chat with the model's chat template (/reset, /exit)",
                       epilog=EPILOG)
    s.add_argument("--system", default=None, help="system message")
    add_gen_flags(s, CHAT_DEFAULTS)
    add_compile_flag(s)
    add_speculative_flags(s, draft=True)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("summarize", help="summarize text files (or stdin) with an instruct model, or a base model "
                       "with --shots", epilog=EPILOG)
    s.add_argument("file", nargs="*", metavar="FILE|-", help="several files are decoded in batches")
    add_gen_flags(s, SUMMARIZE_DEFAULTS)
    add_task_flags(s, "document,summary")
    s.add_argument("--sentences", type=positive_int, default=None, metavar="N",
                   help="sentence budget stated in the prompt (default: the one a fine-tuned model was trained "
                   "with, else \"two or three\"; not used with --shots)")
    add_speculative_flags(s)
    s.set_defaults(func=cmd_summarize)

    s = sub.add_parser("translate", help="translate text files (or stdin) with an instruct model, or a base model "
                       "with --shots", epilog=EPILOG)
    s.add_argument("file", nargs="*", metavar="FILE|-", help="several files are decoded in batches")
    s.add_argument("--to", required=True, help="target language (ISO 639-1 code, e.g. es)")
    s.add_argument("--from", dest="src", default=None, help="source language code (optional; needed by --shots)")
    add_gen_flags(s, TRANSLATE_DEFAULTS, {"max_new_tokens": "tokens to generate at most (default: twice the "
                                                            "input's tokens + 16)"})
    add_task_flags(s, "the --from and --to codes, e.g. en,es", check="numbers and amounts")
    add_speculative_flags(s)
    s.set_defaults(func=cmd_translate)

    s = sub.add_parser("ask", help="answer questions from a context file with an instruct model", epilog=EPILOG)
    s.add_argument("question", nargs="+", metavar="QUESTION", help="several questions are decoded in batches")
    s.add_argument("--context", required=True, metavar="FILE", help="text file the answer must come from")
    add_gen_flags(s, ASK_DEFAULTS)
    add_task_flags(s, None)
    add_speculative_flags(s)
    s.set_defaults(func=cmd_ask)


def add_speculative_flags(s: argparse.ArgumentParser, draft: bool = False) -> None:
    """--speculative and --draft-tokens (and --draft MODEL for generate/chat): decoding/speculative.py."""
    from lmforge.decoding.speculative import DEFAULT_DRAFT_TOKENS

    g = s.add_argument_group("speculative decoding (greedy output as without it, see docs/generation.md; "
                             "sampling keeps the distribution)")
    g.add_argument("--speculative", choices=["auto", "off", "prompt-lookup"], default="auto",
                   help="prompt-lookup: draft the continuation of the latest earlier match of the last tokens in "
                   "the prompt and output, verify the drafts in one forward. auto: " + (
                       "the --draft model when given, else off" if draft else
                       "prompt lookup when inputs are decoded one at a time (one input, or --batch-size 1) on "
                       "float weights, and on int4/int8 weights for answers (ask, eval --task qa: they quote "
                       "their context, measured faster, docs/benchmarks.md); off for batches and for other "
                       "outputs on int4/int8 weights (a k-token verification costs about k/3 steps there, so it "
                       "did not measure faster: ask for prompt-lookup by name)"))
    if draft:
        g.add_argument("--draft", default=None, metavar="MODEL",
                       help="a smaller model of the same tokenizer drafts tokens for --model to verify (loaded "
                       "with the same --quantize, --dtype and --device)")
    g.add_argument("--draft-tokens", type=positive_int, default=DEFAULT_DRAFT_TOKENS, metavar="K",
                   help="drafted tokens verified per forward (1..31)")


def speculate(gen, a: argparse.Namespace) -> None:
    """Set the Generator's speculative default from the flags; load and attach --draft (a draft of another
    tokenizer is refused in one line)."""
    method = getattr(a, "speculative", None)
    if method is None:  # a verb without the flags
        return
    if not 1 <= a.draft_tokens <= 31:
        raise LmforgeError(f"--draft-tokens: must be in 1..31, got {a.draft_tokens}")
    draft = getattr(a, "draft", None)
    if draft:
        gen.set_draft(load_generator(draft, a.quantize, a.dtype, a.device), draft)
    if hasattr(a, "draft"):  # generate/chat: free text rarely quotes its prompt; auto speculates with a draft only
        method = "off" if method == "auto" and not draft else method
        method = "draft" if method == "auto" else method
    gen.speculative, gen.draft_tokens = method, a.draft_tokens


def add_compile_flag(s: argparse.ArgumentParser) -> None:
    """--compile-decode: the eager, traced or torch.compile'd decode step (generate.DecodeOptions)."""
    from lmforge.decoding import AUTO_COMPILE_STEPS, AUTO_TRACE_STEPS, COMPILE_CHOICES

    s.add_argument("--compile-decode", choices=COMPILE_CHOICES, default="auto",
                   help="the per-token step. trace: capture a static-shape step with torch.jit.trace (~0.1-0.3 s "
                        "for SmolLM2, then ~4-10 ms less per token); on: torch.compile it (the first step of each "
                        "shape compiles: ~30 s of CPU for SmolLM2, ~7 s with inductor's disk cache warm; then ~5 ms "
                        "less per token); off: eager; auto: trace once a (batch, cache length) shape has "
                        f"{AUTO_TRACE_STEPS} steps to run in this process, compile once it has {AUTO_COMPILE_STEPS}. "
                        "A capture that fails falls back to eager with a warning; --verbose prints which step ran")


def add_task_flags(s: argparse.ArgumentParser, shot_fields: str | None,
                   check: str = "numbers, amounts, years and names") -> None:
    """--batch-size and --check for a task verb; the few-shot flags where `shot_fields` names the defaults."""
    from lmforge.tasks.prompts import FEWSHOT_HELP

    s.add_argument("--batch-size", type=positive_int, default=8, help="inputs decoded together (left-padded)")
    s.add_argument("--max-prompt-tokens", type=positive_int, default=None, metavar="N",
                   help="cut longer prompts to their first N/2 and last N/2 tokens, as fine-tuning does (default: "
                   "the prompt length a fine-tuned run dir was trained with; else only with --truncate, to the "
                   "context length less --max-new-tokens); stderr says so once")
    for action in s._actions:  # the task verbs cut as fine-tuning does, not add_gen_flags' last tokens
        if action.dest == "truncate":
            action.help = ("cut a prompt too long for the context to its first and last tokens (as fine-tuning "
                           "does) instead of failing")
    s.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help=f"warn on stderr about {check} in the output that the input does not contain")
    if shot_fields is None:
        return
    g = s.add_argument_group("few-shot prompting (base models)", FEWSHOT_HELP)
    g.add_argument("--shots", type=positive_int, default=None, metavar="K", help="examples shown before the input")
    g.add_argument("--shots-file", default=None, metavar="FILE", help="JSONL file the examples come from")
    g.add_argument("--shots-fields", default=None, metavar="IN,OUT",
                   help=f"input and target fields of --shots-file (default: {shot_fields})")
