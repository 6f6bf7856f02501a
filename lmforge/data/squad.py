"""SQuAD v1.1 JSON and JSON-lines (input, target) pairs, with errors that point at the bad element.

A malformed SQuAD file fails with the JSON path of the element, e.g.
``data[3].paragraphs[0].qas[5].answers[0].answer_start: missing``, so a user can find it in a 40 MB file.
Misplaced ``answer_start`` offsets are common in real files, so they are repaired and counted, not fatal.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.readers import read_text_file
from lmforge.errors import DataError

UTF8_HINT = "save it as UTF-8 first, e.g. iconv -f latin1 -t utf-8 FILE > NEW_FILE"

log = logging.getLogger(__name__)


@dataclass
class SquadExample:
    """One question; ``answers[i]`` starts at character ``answer_starts[i]`` of ``context``."""

    id: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]
    title: str = ""


@dataclass
class SquadReadResult:
    """Examples plus how many answer offsets did not point at their text."""

    examples: list[SquadExample]
    path: Path
    realigned: int = 0  # answer_start was off; moved to the nearest occurrence of the answer text
    unaligned: int = 0  # the answer text does not occur in the context; answer_start kept as given

    def __len__(self) -> int:
        return len(self.examples)


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], jp: str, path: Path) -> Any:
    """obj[key] checked for presence and type; the error names the JSON path."""
    if key not in obj:
        raise DataError(f"{path}: {jp}.{key}: missing")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(_json_type(k) for k in kinds)
        raise DataError(f"{path}: {jp}.{key}: expected {names}, got {_json_type(type(value))}")
    return value


def _json_type(t: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        list: "a list",
        dict: "an object",
        bool: "a boolean",
        float: "a number",
        type(None): "null",
    }.get(t, t.__name__)


def _nearest(context: str, text: str, start: int) -> int:
    """Start of the occurrence of ``text`` in ``context`` closest to ``start``, or -1."""
    best, pos = -1, context.find(text)
    while pos != -1:
        if best == -1 or abs(pos - start) < abs(best - start):
            best = pos
        pos = context.find(text, pos + 1)
    return best


def load_squad(path: str | Path) -> SquadReadResult:
    """Read and validate a SQuAD v1.1 file (v2.0 files work: unanswerable questions get no answers)."""
    path = Path(path)
    text = read_text_file(path, hint=UTF8_HINT)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    try:
        root = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno} column {e.colno}: not valid JSON: {e.msg}") from None
    if not isinstance(root, dict):
        raise DataError(
            f"{path}: top level: expected an object with a 'data' list, got {_json_type(type(root))}"
        )
    if "data" not in root:
        raise DataError(
            f"{path}: data: missing (not a SQuAD file? top-level keys: {', '.join(root) or 'none'})"
        )
    data = root["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: data: expected a list, got {_json_type(type(data))}")

    examples: list[SquadExample] = []
    first_seen: dict[str, str] = {}
    realigned = unaligned = 0
    for i, article in enumerate(data):
        ja = f"data[{i}]"
        if not isinstance(article, dict):
            raise DataError(f"{path}: {ja}: expected an object, got {_json_type(type(article))}")
        title = _get(article, "title", str, ja, path) if "title" in article else ""
        for j, para in enumerate(_get(article, "paragraphs", list, ja, path)):
            jp = f"{ja}.paragraphs[{j}]"
            if not isinstance(para, dict):
                raise DataError(f"{path}: {jp}: expected an object, got {_json_type(type(para))}")
            context = _get(para, "context", str, jp, path)
            if not context.strip():
                raise DataError(f"{path}: {jp}.context: empty")
            for k, qa in enumerate(_get(para, "qas", list, jp, path)):
                jq = f"{jp}.qas[{k}]"
                if not isinstance(qa, dict):
                    raise DataError(f"{path}: {jq}: expected an object, got {_json_type(type(qa))}")
                qid = str(_get(qa, "id", (str, int), jq, path))
                if qid in first_seen:
                    raise DataError(f"{path}: {jq}.id: duplicate id {qid!r} (first at {first_seen[qid]})")
                first_seen[qid] = jq
                question = _get(qa, "question", str, jq, path)
                if not question.strip():
                    raise DataError(f"{path}: {jq}.question: empty")
                raw_answers = _get(qa, "answers", list, jq, path)
                if not raw_answers and not qa.get("is_impossible", False):
                    raise DataError(
                        f"{path}: {jq}.answers: empty list (SQuAD v1.1 needs at least one answer)"
                    )
                answers: list[str] = []
                starts: list[int] = []
                for m, ans in enumerate(raw_answers):
                    jn = f"{jq}.answers[{m}]"
                    if not isinstance(ans, dict):
                        raise DataError(f"{path}: {jn}: expected an object, got {_json_type(type(ans))}")
                    atext = _get(ans, "text", str, jn, path)
                    if not atext:
                        raise DataError(f"{path}: {jn}.text: empty")
                    start = _get(ans, "answer_start", int, jn, path)
                    if start < 0:
                        raise DataError(f"{path}: {jn}.answer_start: negative ({start})")
                    if context[start : start + len(atext)] != atext:
                        found = _nearest(context, atext, start)
                        if found == -1:
                            unaligned += 1
                        else:
                            realigned += 1
                            start = found
                    answers.append(atext)
                    starts.append(start)
                examples.append(SquadExample(qid, question, context, answers, starts, title))
    if not examples:
        raise DataError(f"{path}: no questions found (data[].paragraphs[].qas[] is empty)")
    return SquadReadResult(examples, path, realigned, unaligned)


def read_squad(path: str | Path) -> list[SquadExample]:
    """The examples of a SQuAD file; misplaced answer offsets are logged as one warning, not raised."""
    result = load_squad(path)
    if result.realigned or result.unaligned:
        total = sum(len(ex.answers) for ex in result.examples)
        log.warning(
            "%s: %d of %d answers had an answer_start that did not point at the answer text: "
            "%d moved to the nearest occurrence, %d not found in the context (kept as given)",
            result.path,
            result.realigned + result.unaligned,
            total,
            result.realigned,
            result.unaligned,
        )
    return result.examples


def read_jsonl_pairs(
    path: str | Path,
    input_field: str,
    target_field: str,
    limit: int | None = None,
    *,
    skip_empty: bool = False,
    encoding: str | None = None,
) -> list[tuple[str, str]]:
    """(input, target) string pairs from JSON lines, e.g. document/summary or en/es, in file order.

    Empty inputs or targets raise a DataError naming the line, or are dropped with ``skip_empty=True``.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise DataError(f"{path}: limit must be at least 1, got {limit}")
    text = read_text_file(path, encoding, hint=UTF8_HINT)
    pairs: list[tuple[str, str]] = []
    seen_rows = False
    # split on \n only: str.splitlines() also breaks at U+2028 and other separators JSON strings may hold
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        seen_rows = True
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {n} is not a JSON object (got {type(obj).__name__})")
        values = []
        for name in (input_field, target_field):
            if name not in obj:
                raise DataError(
                    f"{path}: line {n}: missing field {name!r}; fields found: "
                    f"{', '.join(map(repr, obj)) or '(none)'}"
                )
            value = obj[name]
            if not isinstance(value, str):
                raise DataError(
                    f"{path}: line {n}: field {name!r} must be a string, got {type(value).__name__}"
                )
            values.append(value.strip())
        if not values[0] or not values[1]:
            if skip_empty:
                continue
            name = input_field if not values[0] else target_field
            raise DataError(f"{path}: line {n}: field {name!r} is empty")
        pairs.append((values[0], values[1]))
        if limit is not None and len(pairs) >= limit:
            break
    if not seen_rows:
        raise DataError(f"{path}: file is empty (no rows)")
    return pairs
