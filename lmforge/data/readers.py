"""Readers for labelled text (CSV, TSV, JSON lines) that fail with one clear line instead of a traceback.

Every problem a user can cause with an input file (wrong path, wrong encoding, a ragged row, a missing
column) becomes a ``DataError`` whose message names the file, the line and the cause, because the CLI
prints exactly that line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.bounds import MAX_FIELD_CHARS
from lmforge.errors import DataError

FORMATS = ("csv", "tsv", "jsonl")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


@dataclass
class Example:
    """One classification example; ``label`` is None for unlabelled (prediction) input."""

    text: str
    label: str | None
    text_pair: str | None = None


@dataclass
class ReadResult:
    """What a reader found: the examples plus what it skipped, so callers can report it."""

    examples: list[Example]
    skipped_empty: int
    path: Path
    fmt: str = ""
    columns: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


# ----------------------------------------------------------------------------------------------- file text


def read_text_file(path: str | Path, encoding: str | None = None,
                   hint: str = "pass the file's encoding, e.g. --encoding latin-1") -> str:
    """Read a whole text file; without ``encoding`` it must be UTF-8 and the error says where it is not."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    if encoding is None:
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            bad = data[e.start]
            raise DataError(
                f"{path}: line {line} (byte offset {e.start}) is not valid UTF-8 (byte 0x{bad:02x}); "
                f"{hint}"
            ) from None
    try:
        return data.decode(encoding)
    except LookupError:
        raise DataError(f"{path}: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: line {line} (byte offset {e.start}) cannot be decoded as {encoding}: {e.reason}"
        ) from None


def detect_format(path: str | Path, fmt: str | None = None) -> str:
    """Pick the reader from ``fmt`` or the file extension (``.json`` means JSON lines or a JSON array)."""
    path = Path(path)
    if fmt is not None:
        f = fmt.lower().lstrip(".")
        f = {"json": "jsonl", "ndjson": "jsonl"}.get(f, f)
        if f not in FORMATS:
            raise DataError(f"{path}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        return f
    ext = path.suffix.lower()
    if ext not in _EXTENSIONS:
        raise DataError(
            f"{path}: cannot tell the format from extension {ext or '(none)'!r}; "
            f"use .csv, .tsv or .jsonl, or pass --format"
        )
    return _EXTENSIONS[ext]


def _cell(value: Any, path: Path, where: str, name: str) -> str | None:
    """Stringify a JSON value for a text or label field: numbers and booleans become strings, null None."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    raise DataError(
        f"{path}: {where}: field {name!r} must be a string or a number, got {type(value).__name__}"
    )


# ------------------------------------------------------------------------------------------- row sources


def _csv_rows(text: str, path: Path, fmt: str) -> tuple[list[str], Iterable[tuple[int, dict[str, str]]]]:
    """Header plus (line number, row dict); TSV is read without quote handling, like GLUE-style files."""
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        while header is not None and not header:  # leading blank lines
            header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: malformed {fmt.upper()}: {e}") from None
    if header is None:
        raise DataError(f"{path}: file is empty (no header, no rows)")
    header = [h.strip() for h in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(
            f"{path}: line {reader.line_num}: header repeats column(s) {', '.join(map(repr, dupes))}"
        )

    def rows() -> Iterable[tuple[int, dict[str, str]]]:
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}: line {start}: malformed {fmt.upper()}: {e}") from None
            if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                continue  # blank line
            if len(row) != len(header):
                raise DataError(
                    f"{path}: line {start} has {len(row)} fields but the header has {len(header)} "
                    f"(a stray delimiter or an unquoted {'tab' if fmt == 'tsv' else 'comma'}?)"
                )
            yield start, dict(zip(header, row))

    return header, rows()


def _json_rows(
    text: str, path: Path, allow_array: bool
) -> tuple[list[str], Iterable[tuple[str, dict[str, Any]]]]:
    """(location, object) pairs from JSON lines, or (``.json`` only) a top-level JSON array of objects."""
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: file is empty (no rows)")
    items: list[tuple[str, Any]] = []
    if allow_array and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}") from None
        items = [(f"item [{i}]", obj) for i, obj in enumerate(data)]
    else:
        # split on \n only: str.splitlines() also breaks at U+2028 and other separators JSON strings may hold
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from None
            items.append((f"line {n}", obj))
    if not items:
        raise DataError(f"{path}: file is empty (no rows)")
    for where, obj in items:
        if not isinstance(obj, dict):
            raise DataError(f"{path}: {where} is not a JSON object (got {type(obj).__name__})")
    return list(items[0][1].keys()), items


# -------------------------------------------------------------------------------------------------- reader


def read_examples(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str | None = "label",
    text_pair_column: str | None = None,
    encoding: str | None = None,
    strict: bool = False,
    fmt: str | None = None,
) -> ReadResult:
    """Read classification examples; ``label_column=None`` reads unlabelled text for prediction.

    Rows whose text (or text pair) is empty are skipped and counted, or rejected with ``strict=True``.
    Labels are stripped and stringified, so JSON 0/1 become "0"/"1"; a number in a text field is used as its
    text too, with one warning naming the first such row (it is usually a column mix-up). A text longer than
    ``MAX_FIELD_CHARS`` is refused with the row named (see data/bounds.py).
    """
    path = Path(path)
    kind = detect_format(path, fmt)
    text = read_text_file(path, encoding)
    wanted = [("text", text_column)]
    if label_column is not None:
        wanted.append(("label", label_column))
    if text_pair_column is not None:
        wanted.append(("text pair", text_pair_column))

    examples: list[Example] = []
    skipped = 0
    numeric: list[str] = []  # "line N: field 'text' (5)" of each row whose text field holds a number

    def add(where: str, raw_text: str | None, raw_label: str | None, raw_pair: str | None) -> None:
        nonlocal skipped
        for col, raw in ((text_column, raw_text), (text_pair_column, raw_pair)):
            if raw is not None and len(raw) > MAX_FIELD_CHARS:
                raise DataError(f"{path}: {where}: field {col!r} holds {len(raw):,} characters, over the limit of "
                                f"{MAX_FIELD_CHARS:,} for one text (split the document or drop the row)")
        t = (raw_text or "").strip()
        p = (raw_pair or "").strip() if text_pair_column is not None else None
        if not t or (text_pair_column is not None and not p):
            col = text_column if not t else text_pair_column
            if strict:
                raise DataError(f"{path}: {where}: empty text in {col!r} (strict mode)")
            skipped += 1
            return
        label = None
        if label_column is not None:
            label = (raw_label or "").strip()
            if not label:
                raise DataError(f"{path}: {where}: empty label in {label_column!r}")
        examples.append(Example(text=t, label=label, text_pair=p))

    if kind in ("csv", "tsv"):
        header, rows = _csv_rows(text, path, kind)
        for what, col in wanted:
            if col not in header:
                raise DataError(
                    f"{path}: no {what} column {col!r}; columns found: {', '.join(map(repr, header))}"
                )
        columns = header
        for line, row in rows:
            add(
                f"line {line}",
                row[text_column],
                row[label_column] if label_column is not None else None,
                row[text_pair_column] if text_pair_column is not None else None,
            )
        if not examples and not skipped:
            raise DataError(f"{path}: has a header but no data rows")
    else:
        allow_array = (fmt or path.suffix).lower().lstrip(".") == "json"
        columns, items = _json_rows(text, path, allow_array)
        for where, obj in items:
            for what, col in wanted:
                if col not in obj:
                    raise DataError(
                        f"{path}: {where}: missing {what} field {col!r}; fields found: "
                        f"{', '.join(map(repr, obj.keys())) or '(none)'}"
                    )
            for col in (text_column, text_pair_column):
                if col is not None and isinstance(obj[col], (int, float)):  # bool too
                    numeric.append(f"{where}: field {col!r} ({json.dumps(obj[col])})")
            add(
                where,
                _cell(obj[text_column], path, where, text_column),
                _cell(obj[label_column], path, where, label_column) if label_column is not None else None,
                _cell(obj[text_pair_column], path, where, text_pair_column)
                if text_pair_column is not None
                else None,
            )
    if numeric:
        more = f" (and {len(numeric) - 1} more row(s))" if len(numeric) > 1 else ""
        logging.getLogger("lmforge").warning("%s: %s holds a number, not text; it is used as the text%s", path,
                                             numeric[0], more)
    return ReadResult(examples=examples, skipped_empty=skipped, path=path, fmt=kind, columns=list(columns))


# -------------------------------------------------------------------------------------------------- labels


def _label_sort_key(labels: Iterable[str]) -> Any:
    """Integers sort numerically ("2" before "10"), anything else as plain strings."""
    labels = list(labels)
    try:
        [int(x) for x in labels]
    except ValueError:
        return None
    return int


def build_label_map(train_examples: Sequence[Example], path: str | Path | None = None) -> list[str]:
    """The sorted label names of the training data; index i is class id i, stable across runs."""
    where = f"{path}: " if path is not None else ""
    if not train_examples:
        raise DataError(f"{where}training data has no examples")
    missing = sum(1 for ex in train_examples if ex.label is None)
    if missing:
        raise DataError(f"{where}{missing} training example(s) have no label")
    labels = {ex.label for ex in train_examples}
    if len(labels) < 2:
        raise DataError(
            f"{where}training data has only one label ({next(iter(labels))!r}); a classifier needs at least two"
        )
    return sorted(labels, key=_label_sort_key(labels))  # type: ignore[arg-type]


def case_collisions(labels: Iterable[str]) -> list[list[str]]:
    """Groups of labels that differ only by case ("POS", "pos"): they are separate classes, which is rarely meant."""
    groups: dict[str, list[str]] = defaultdict(list)
    for label in labels:
        groups[label.casefold()].append(label)
    return [sorted(g) for _, g in sorted(groups.items()) if len(g) > 1]


def check_eval_labels(eval_examples: Sequence[Example], labels: Sequence[str], path: str | Path) -> None:
    """Reject evaluation labels the model cannot predict, instead of silently scoring them as errors."""
    known = set(labels)
    unknown: Counter[str] = Counter()
    unlabelled = 0
    for ex in eval_examples:
        if ex.label is None:
            unlabelled += 1
        elif ex.label not in known:
            unknown[ex.label] += 1
    if unlabelled:
        raise DataError(f"{path}: {unlabelled} evaluation example(s) have no label")
    if unknown:
        label, count = min(unknown.items(), key=lambda kv: (-kv[1], kv[0]))
        more = f" (and {len(unknown) - 1} more unknown label(s))" if len(unknown) > 1 else ""
        raise DataError(
            f"{path}: label {label!r} ({count} example(s)) appears only in the evaluation data, not in "
            f"the training labels {', '.join(map(repr, labels))}{more}"
        )


def stratified_split(
    examples: Sequence[Example], eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Deterministic per-class split; each class with >= 2 examples lands in both parts.

    Each class gives ``round(n * eval_fraction)`` examples (at least 1, at most n - 1) to the evaluation
    part, picked with ``random.Random(seed)``; both parts keep the input order.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    by_label: dict[str | None, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_label[ex.label].append(i)
    rng = random.Random(seed)
    eval_idx: set[int] = set()
    for label in sorted(by_label, key=lambda x: (x is None, x or "")):
        idx = by_label[label]
        if len(idx) < 2:
            continue
        k = min(max(math.floor(len(idx) * eval_fraction + 0.5), 1), len(idx) - 1)
        shuffled = idx[:]
        rng.shuffle(shuffled)
        eval_idx.update(shuffled[:k])
    train = [ex for i, ex in enumerate(examples) if i not in eval_idx]
    held = [ex for i, ex in enumerate(examples) if i in eval_idx]
    return train, held
