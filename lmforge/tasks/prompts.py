"""Zero-shot prompts for instruct models: summarize, translate, answer from a context.

Fine-tuned seq2seq models use the same prompt shapes (tasks/seq2seq.py), so a model fine-tuned with
`lmforge finetune --task translate` answers `lmforge translate` with the prompt it was trained on.
"""

from __future__ import annotations

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


def summarize_prompt(text: str) -> str:
    return f"Summarize the following text in two or three sentences.\n\n{text.strip()}"


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
