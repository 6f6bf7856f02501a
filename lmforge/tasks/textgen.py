"""Task generation for the Python API and the CLI: summarize, translate, answer, batched, each output checked.

Each result carries `unsupported`: the numbers, amounts, years, centuries and names (not for translations)
of the output that its source lacks (tasks/grounding.py), so a caller can flag a summary that turned pounds
into dollars without reading it against the article. Prompts are the zero-shot ones of tasks/prompts.py
(through the chat template), or a FewShot prompt (plain text, its stop strings) for base models.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lmforge.tasks import prompts as P
from lmforge.tasks.grounding import check
from lmforge.tasks.prompts import cut_middle, cut_note


@dataclass
class TaskOutput:
    """One generated text and what in it its source does not support ([] = nothing found, not "correct")."""

    text: str
    unsupported: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class PromptCut:
    """Prompts over `limit` tokens (as the model sees them: chat template included) are cut to their first and
    last tokens (prompts.cut_middle, fine-tuning's cut) before decoding; `why` names where the limit came from."""

    limit: int
    why: str


def prompt_cut(gen, model: str | None = None, *, max_new_tokens: int | None = None,
               max_prompt_tokens: int | None = None, truncate: bool = False) -> PromptCut | None:
    """How long prompts are cut for `gen` (None: not at all; one over the context then fails in the Generator).

    max_prompt_tokens given: that. A fine-tuned run dir (`model`, default gen.name): the prompt length it was
    trained with (seq2seq.trained_prompt_length). Else, with `truncate`: the context length less
    max_new_tokens. Never more than that room."""
    from lmforge.tasks.seq2seq import trained_prompt_length

    ctx = getattr(getattr(getattr(gen, "model", None), "cfg", None), "context_length", None)
    if max_new_tokens is None:
        from lmforge.decoding import GenerationConfig

        max_new_tokens = GenerationConfig().max_new_tokens
    room = ctx - max_new_tokens if isinstance(ctx, int) and ctx > max_new_tokens else None
    name = model if model is not None else getattr(gen, "name", None)
    trained = trained_prompt_length(str(name)) if name else None
    if max_prompt_tokens:
        cut = PromptCut(max_prompt_tokens, "--max-prompt-tokens")
    elif trained:
        cut = PromptCut(trained, f"the prompt length {name} was fine-tuned with")
    elif truncate and room:
        return PromptCut(room, "the context length less max_new_tokens")
    else:
        return None
    return PromptCut(room, "the context length less max_new_tokens") if room and room < cut.limit else cut


def fit_prompts(gen, prompts: list[str], cut: PromptCut, chat: bool) -> tuple[list[str], int]:
    """-> (prompts, how many were cut). When none is over cut.limit tokens the prompts come back unchanged;
    else each comes back as the exact text the model sees (chat template applied), the long ones cut, to be
    decoded with chat=False and add_special_tokens=not chat (what the Generator does for `chat` itself)."""
    tok = gen.tokenizer
    rendered = [gen.format_chat([{"role": "user", "content": p}]) if chat else p for p in prompts]
    cuts = {i: c for i, t in enumerate(rendered) if (c := cut_text(tok, t, not chat, cut.limit)) is not None}
    if not cuts:
        return prompts, 0
    return [cuts.get(i, t) for i, t in enumerate(rendered)], len(cuts)


def cut_text(tok, text: str, special: bool, limit: int) -> str | None:
    """`text` (encoded with add_special_tokens=special) cut to at most `limit` tokens by prompts.cut_middle, as
    text to encode the same way; None when it fits. Special tokens the tokenizer adds (a BOS) count toward the
    limit, as in fine-tuning, and are left for the encoder to add again."""
    full = tok.encode(text, add_special_tokens=special)
    if len(full) <= limit:
        return None
    plain = tok.encode(text, add_special_tokens=False) if special else full
    extra = len(full) - len(plain)
    pre = extra if full[extra:] == plain else 0  # added in front (a BOS), else at the end
    budget, out = limit, text
    for _ in range(4):  # decoding and re-encoding may merge tokens across the cut: shrink until it fits
        kept = cut_middle(full, budget)
        out = tok.decode(kept[pre: len(kept) - (extra - pre)], skip_special_tokens=False)
        over = len(tok.encode(out, add_special_tokens=special)) - limit
        if over <= 0:
            break
        budget -= over
    return out


def cut_prompts(gen, prompts: list[str], cut: PromptCut, chat: bool, desc: str,
                log: Callable[[str], None] | None = None) -> tuple[list[str], bool, bool | None]:
    """fit_prompts, and the note that says how inputs are cut, once (`log`, default stderr), when one is.
    -> (prompts, chat, add_special_tokens or None) to decode them with."""
    fitted, n_cut = fit_prompts(gen, prompts, cut, chat)
    if not n_cut:
        return prompts, chat, None
    (log or _stderr)(f"{desc}: {cut_note(cut.limit, n_cut, len(prompts), cut.why)}")
    return fitted, False, not chat


def generate_batched(gen, prompts: list[str], *, batch_size: int = 8, desc: str = "generate",
                     progress: bool = False, done: Mapping[int, str] | None = None,
                     on_batch: Callable[[dict[int, str]], None] | None = None, cut: PromptCut | None = None,
                     log: Callable[[str], None] | None = None, **gen_kw) -> list[str]:
    """Each prompt's stripped output, decoded batch_size at a time (left-padded; longest first, so the ETA is
    honest). `done`: outputs already decoded by index (an interrupted run's), skipped; `on_batch` gets each
    batch's {index: text} as it finishes (e.g. to append them to a file). `progress`: a tqdm bar on stderr.
    `cut`: long prompts are cut (fit_prompts), which `log` (default: stderr) says once."""
    from tqdm import tqdm

    done = done or {}
    if cut is not None:
        todo = [i for i in range(len(prompts)) if i not in done]
        fitted, chat, special = cut_prompts(gen, [prompts[i] for i in todo], cut, bool(gen_kw.get("chat")), desc,
                                            log)
        prompts = list(prompts)
        for i, p in zip(todo, fitted):
            prompts[i] = p
        gen_kw = {**gen_kw, "chat": chat} | ({"add_special_tokens": special} if special is not None else {})
    texts = [done.get(i, "") for i in range(len(prompts))]
    todo = sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: -len(prompts[i]))
    disable = None if progress else True  # None: tqdm shows the bar only on a terminal
    with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=desc, unit="text", disable=disable) as bar:
        for s in range(0, len(todo), batch_size):
            idx = todo[s: s + batch_size]
            outs = gen.generate([prompts[i] for i in idx], **gen_kw)
            got = {i: t.strip() for i, t in zip(idx, outs)}
            for i, t in got.items():
                texts[i] = t
            if on_batch is not None:
                on_batch(got)
            bar.update(len(idx))
    return texts


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def run_prompts(gen, task: str, sources: list[str], prompts: list[str], *, fewshot: P.FewShot | None = None,
                batch_size: int = 8, progress: bool = False, truncate: bool = False,
                max_prompt_tokens: int | None = None, log: Callable[[str], None] | None = None,
                on_output: Callable[[int, TaskOutput], None] | None = None, **gen_kw) -> list[TaskOutput]:
    """Decode `prompts` (generate_batched) and check each output against its source. `on_output(i, output)`
    is called as each batch finishes (longest prompts first), e.g. to print results before the last batch.
    Long prompts are cut as prompt_cut says (a fine-tuned run dir: to the length it was trained with)."""
    if fewshot is not None:
        gen_kw["stop_strings"] = [*(gen_kw.get("stop_strings") or []), *fewshot.stop_strings]
    outs: dict[int, TaskOutput] = {}

    def finished(batch: dict[int, str]) -> None:
        for i in sorted(batch):
            outs[i] = TaskOutput(batch[i], check(sources[i], batch[i], task))
            if on_output is not None:
                on_output(i, outs[i])

    cut = prompt_cut(gen, max_new_tokens=gen_kw.get("max_new_tokens"), max_prompt_tokens=max_prompt_tokens,
                     truncate=truncate)
    generate_batched(gen, prompts, batch_size=batch_size, desc=task, progress=progress, on_batch=finished,
                     chat=fewshot is None, truncate=truncate, cut=cut, log=log, **gen_kw)
    return [outs[i] for i in range(len(prompts))]


def _one_or_many(x: str | list[str]) -> tuple[list[str], bool]:
    return ([x], True) if isinstance(x, str) else (list(x), False)


def summarize(gen, text: str | list[str], *, fewshot: P.FewShot | None = None, sentences: int | None = None,
              **kw) -> TaskOutput | list[TaskOutput]:
    """Summaries of one text (-> TaskOutput) or several (-> list, decoded in batches); `sentences` is the
    length budget the prompt states (default: the one a fine-tuned run dir was trained with, as in the CLI)."""
    from lmforge.tasks.seq2seq import sentence_budget

    texts, single = _one_or_many(text)
    sentences = sentence_budget(sentences, getattr(gen, "name", None))
    ps = [fewshot.prompt(t) if fewshot else P.summarize_prompt(t, sentences) for t in texts]
    kw.setdefault("max_new_tokens", 160)
    kw.setdefault("no_repeat_ngram_size", 4)
    out = run_prompts(gen, "summarize", texts, ps, fewshot=fewshot, **kw)
    return out[0] if single else out


def translate(gen, text: str | list[str], to: str, src: str | None = None, *, fewshot: P.FewShot | None = None,
              **kw) -> TaskOutput | list[TaskOutput]:
    """Translations into `to` (ISO 639-1 code); only numbers and amounts are checked (names change across
    languages). max_new_tokens defaults to twice the longest input's tokens + 16."""
    texts, single = _one_or_many(text)
    P.language_name(to, "--to")
    ps = [fewshot.prompt(t) if fewshot else P.translate_prompt(t, to, src) for t in texts]
    kw.setdefault("max_new_tokens", 2 * max(len(gen.tokenizer.encode(t, add_special_tokens=False))
                                            for t in texts) + 16)
    kw.setdefault("no_repeat_ngram_size", 4)
    out = run_prompts(gen, "translate", texts, ps, fewshot=fewshot, **kw)
    return out[0] if single else out


def answer(gen, context: str, question: str | list[str], **kw) -> TaskOutput | list[TaskOutput]:
    """Answers to one question or several about one context, checked against the context."""
    qs, single = _one_or_many(question)
    kw.setdefault("max_new_tokens", 64)
    kw.setdefault("no_repeat_ngram_size", 4)
    kw.setdefault("quoting", True)  # answers copy their context: "auto" speculates on quantized weights too
    out = run_prompts(gen, "answer", [context] * len(qs), [P.answer_prompt(context, q) for q in qs], **kw)
    return out[0] if single else out
