"""Zero-shot prompts for instruct models (summarize, translate, answer from a context), and few-shot prompts
for base models (FewShot: K solved examples from a JSONL file before the input, plain text).

Fine-tuned seq2seq models use the same prompt shapes (tasks/seq2seq.py), so a model fine-tuned with
`lmforge finetune --task translate` answers `lmforge translate` with the prompt it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import GenerationError

# ISO 639-1 codes we accept for --to / --from, with the English name used in the prompt.
LANGUAGES: dict[str, str] = {
    "ar": "Arabic", "bg": "Bulgarian", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian", "fa": "Persian", "fi": "Finnish",
    "fr": "French", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "id": "Indonesian",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian", "nl": "Dutch",
    "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sk": "Slovak",
    "sl": "Slovenian", "sr": "Serbian", "sv": "Swedish", "th": "Thai", "tr": "Turkish", "uk": "Ukrainian",
    "vi": "Vietnamese", "zh": "Chinese",
}


def language_name(code: str, field: str = "--to") -> str:
    c = code.strip().lower()
    if c in LANGUAGES:
        return LANGUAGES[c]
    names = {v.lower(): v for v in LANGUAGES.values()}
    if c in names:
        return names[c]
    raise GenerationError(f"{field}: unknown language code {code!r} (use an ISO 639-1 code such as "
                          f"en, es, fr, de; known: {', '.join(sorted(LANGUAGES))})")


NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def summarize_prompt(text: str, sentences: int | None = None) -> str:
    """The summarize instruction; `sentences` is the length budget it states (None: "two or three")."""
    if sentences is None:
        budget = "two or three sentences"
    elif sentences < 1:
        raise GenerationError(f"--sentences must be at least 1, got {sentences}")
    else:
        word = NUMBER_WORDS[sentences - 1] if sentences <= len(NUMBER_WORDS) else str(sentences)
        budget = "one sentence" if sentences == 1 else f"at most {word} sentences"
    return f"Summarize the following text in {budget}.\n\n{text.strip()}"


def translate_prompt(text: str, to: str, src: str | None = None) -> str:
    tgt = language_name(to, "--to")
    frm = f" from {language_name(src, '--from')}" if src else ""
    return f"Translate the following text{frm} to {tgt}. Reply with the translation only.\n\n{text.strip()}"


def answer_prompt(context: str, question: str) -> str:
    return ("Answer the question using only the context below. Answer briefly.\n\n"
            f"Context:\n{context.strip()}\n\nQuestion: {question.strip()}")


def instruct_prompt(instruction: str) -> str:
    return instruction.strip()


TASK_PROMPTS = {"summarize": summarize_prompt, "instruct": instruct_prompt}


# ---- long prompts ------------------------------------------------------------------------------------------
def cut_middle(ids: list[int], limit: int) -> list[int]:
    """`ids` cut to `limit` tokens the one way lmforge cuts a long prompt, in fine-tuning (seq2seq.build_example)
    and at inference (eval, the task verbs): its first limit // 2 and last limit - limit // 2 tokens, so the
    instruction (at the start) and the question or chat-template turn end (at the end) both survive."""
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head):]


def cut_note(limit: int, n_cut: int, n_total: int, why: str) -> str:
    """The one line that says how long inputs are cut (printed once per run)."""
    head = limit // 2
    return (f"inputs over {limit} tokens are cut to their first {head} and last {limit - head} tokens, as "
            f"fine-tuning did ({why}): {n_cut} of {n_total} inputs")


# ---- few-shot prompts for base models ----------------------------------------------------------------------
FEWSHOT_HELP = """few-shot prompt (--shots K, for base models): plain text, no chat template, built as
  <instruction>                         "Translate English to Spanish." ("Translate each text to Spanish."
                                        without --from) or "Summarize each document in two or three sentences."
  <blank line>
  <In>: <input of shot 1>               In/Out: English:/Spanish: (translate; Text: without --from),
  <Out>: <target of shot 1>             Document:/Summary: (summarize)
  <blank line> ... K shots ...
  <In>: <your text>
  <Out>:
The shots are the first K rows of --shots-file (JSONL with the task's input and target fields) whose input
is not one of the inputs being processed (in `eval`: the evaluated rows, so --shots-file may be --data);
each text is put on one line (runs of whitespace become one space) and the reply ends at a blank line or at
the next "<In>:" line."""


@dataclass(frozen=True)
class FewShot:
    """K solved examples shown before the input so that a base model (no instruction tuning) continues the
    pattern; `prompt(text)` is the exact text the model sees, `stop_strings` end its reply."""

    instruction: str
    in_label: str
    out_label: str
    shots: tuple[tuple[str, str], ...]
    rows: tuple[int, ...] = ()  # 1-based row numbers of the shots in their file (rows = non-blank lines)

    def prompt(self, text: str) -> str:
        blocks = [self.instruction]
        blocks += [f"{self.in_label}: {one_line(x)}\n{self.out_label}: {one_line(y)}" for x, y in self.shots]
        blocks.append(f"{self.in_label}: {one_line(text)}\n{self.out_label}:")
        return "\n\n".join(blocks)

    @property
    def stop_strings(self) -> list[str]:
        return ["\n\n", f"\n{self.in_label}:"]


def one_line(text: str) -> str:
    return " ".join(text.split())


def fewshot_labels(task: str, to: str | None = None, src: str | None = None) -> tuple[str, str, str]:
    """(instruction, input label, output label) of a task's few-shot prompt."""
    if task == "summarize":
        return "Summarize each document in two or three sentences.", "Document", "Summary"
    if task == "translate":
        tgt = language_name(to or "", "--to")
        if src:
            s = language_name(src, "--from")
            return f"Translate {s} to {tgt}.", s, tgt
        return f"Translate each text to {tgt}.", "Text", tgt
    raise GenerationError(f"--shots: few-shot prompts exist for summarize and translate, not {task!r}")


def load_fewshot(path: str | Path, k: int, task: str, input_field: str, target_field: str, *,
                 to: str | None = None, src: str | None = None, exclude: Iterable[str] = ()) -> FewShot:
    """The first `k` rows of a JSONL shots file whose input is not in `exclude` (the evaluated inputs, so a
    score never sees its own answers); a bad file fails in one line naming the file, line and field."""
    from lmforge.data.squad import read_jsonl_pairs
    from lmforge.errors import DataError

    if k < 1:
        raise DataError(f"--shots: must be at least 1, got {k}")
    instruction, in_label, out_label = fewshot_labels(task, to, src)
    pairs = read_jsonl_pairs(path, input_field, target_field)
    banned = {one_line(x) for x in exclude}
    picked = [(i + 1, x, y) for i, (x, y) in enumerate(pairs) if one_line(x) not in banned][:k]
    if len(picked) < k:
        left = f"{len(picked)} of its {len(pairs)} rows are" + (" not evaluated rows" if banned else "")
        raise DataError(f"{path}: --shots {k} needs {k} rows but {left}")
    return FewShot(instruction, in_label, out_label, tuple((x, y) for _, x, y in picked),
                   tuple(i for i, _, _ in picked))
