"""Task generation for the Python API and the CLI: summarize, translate, answer, batched, each output checked.

Each result carries `unsupported`: the numbers, amounts, years, centuries and names (not for translations)
of the output that its source lacks (tasks/grounding.py), so a caller can flag a summary that turned pounds
into dollars without reading it against the article. Prompts are the zero-shot ones of tasks/prompts.py
(through the chat template), or a FewShot prompt (plain text, its stop strings) for base models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lmforge.tasks import prompts as P
from lmforge.tasks.grounding import check


@dataclass
class TaskOutput:
    """One generated text and what in it its source does not support ([] = nothing found, not "correct")."""

    text: str
    unsupported: list[dict[str, str]] = field(default_factory=list)


def generate_batched(gen, prompts: list[str], *, batch_size: int = 8, desc: str = "generate",
                     progress: bool = False, done: Mapping[int, str] | None = None,
                     on_batch: Callable[[dict[int, str]], None] | None = None, **gen_kw) -> list[str]:
    """Each prompt's stripped output, decoded batch_size at a time (left-padded; longest first, so the ETA is
    honest). `done`: outputs already decoded by index (an interrupted run's), skipped; `on_batch` gets each
    batch's {index: text} as it finishes (e.g. to append them to a file). `progress`: a tqdm bar on stderr."""
    from tqdm import tqdm

    done = done or {}
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


def run_prompts(gen, task: str, sources: list[str], prompts: list[str], *, fewshot: P.FewShot | None = None,
                batch_size: int = 8, progress: bool = False, truncate: bool = False,
                on_output: Callable[[int, TaskOutput], None] | None = None, **gen_kw) -> list[TaskOutput]:
    """Decode `prompts` (generate_batched) and check each output against its source. `on_output(i, output)`
    is called as each batch finishes (longest prompts first), e.g. to print results before the last batch."""
    if fewshot is not None:
        gen_kw["stop_strings"] = [*(gen_kw.get("stop_strings") or []), *fewshot.stop_strings]
    outs: dict[int, TaskOutput] = {}

    def finished(batch: dict[int, str]) -> None:
        for i in sorted(batch):
            outs[i] = TaskOutput(batch[i], check(sources[i], batch[i], task))
            if on_output is not None:
                on_output(i, outs[i])

    generate_batched(gen, prompts, batch_size=batch_size, desc=task, progress=progress, on_batch=finished,
                     chat=fewshot is None, truncate=truncate, **gen_kw)
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
    out = run_prompts(gen, "answer", [context] * len(qs), [P.answer_prompt(context, q) for q in qs], **kw)
    return out[0] if single else out
