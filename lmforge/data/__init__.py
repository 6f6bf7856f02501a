"""Data readers: labelled text files, built-in datasets, SQuAD and seq2seq JSON lines."""

from lmforge.data.datasets import BUILTIN_DATASETS, is_builtin, load_builtin
from lmforge.data.readers import (
    Example,
    ReadResult,
    build_label_map,
    check_eval_labels,
    detect_format,
    read_examples,
    read_text_file,
    stratified_split,
)
from lmforge.data.squad import SquadExample, SquadReadResult, load_squad, read_jsonl_pairs, read_squad

__all__ = [
    "BUILTIN_DATASETS",
    "Example",
    "ReadResult",
    "SquadExample",
    "SquadReadResult",
    "build_label_map",
    "check_eval_labels",
    "detect_format",
    "is_builtin",
    "load_builtin",
    "load_squad",
    "read_examples",
    "read_jsonl_pairs",
    "read_squad",
    "read_text_file",
    "stratified_split",
]
