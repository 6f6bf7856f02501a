"""Structured output on the command line: `generate --json-schema FILE | --regex R | --grammar FILE | --choices
a,b,c` (flags added to `generate` from here) and the `extract` verb (a schema filled from each document of a
JSONL file; lmforge/tasks/extract.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmforge.cli.common import EPILOG, add_gen_flags, gen_kwargs, load_generator, positive_int
from lmforge.errors import LmforgeError

EXTRACT_DEFAULTS = {"max_new_tokens": 256}
# With a constraint, the free-text guards of `generate` (a repetition penalty, an n-gram ban) would fight the
# structure (JSON repeats `", "` by design): they are off unless given on the command line.
FREE_TEXT_GUARDS = (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0))


def add_constraint_flags(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", default=None, metavar="FILE",
                   help="the output is one JSON value that follows this JSON schema file")
    g.add_argument("--regex", default=None, metavar="R", help="the output matches this regular expression (whole)")
    g.add_argument("--grammar", default=None, metavar="FILE",
                   help="the output follows this context-free grammar file (Lark, or GBNF as llama.cpp writes it)")
    g.add_argument("--choices", default=None, metavar="A,B,C", help="the output is one of these strings")


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise LmforgeError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None


def constraint_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """The Generator.generate option of the constraint flags ({} without one); bad files fail in one line."""
    if getattr(a, "json_schema", None) is not None:
        try:
            return {"json_schema": json.loads(_read(a.json_schema, "--json-schema"))}
        except ValueError as e:
            raise LmforgeError(f"--json-schema {a.json_schema}: not valid JSON ({e})") from None
    if getattr(a, "regex", None) is not None:
        return {"regex": a.regex}
    if getattr(a, "grammar", None) is not None:
        return {"grammar": _read(a.grammar, "--grammar")}
    if getattr(a, "choices", None) is not None:
        choices = [c.strip() for c in a.choices.split(",")]
        if not all(choices):
            raise LmforgeError(f"--choices: expected A,B,C (non-empty strings), got {a.choices!r}")
        return {"choices": choices}
    return {}


def with_constraint(a: argparse.Namespace, kw: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """kw plus the constraint option; the free-text guards off where they still have the verb's `defaults`."""
    extra = constraint_kwargs(a)
    if not extra:
        return kw
    guards = {k: v for k, v in FREE_TEXT_GUARDS if kw.get(k) == defaults.get(k)}
    return {**kw, **guards, **extra}


def check_complete(gen, kw: dict[str, Any]) -> None:
    """A constrained output cut by max_new_tokens is not presented as complete: one line, exit 2."""
    if any(k in kw for k in ("json_schema", "regex", "grammar", "choices")) and \
            "length" in getattr(gen, "finish_reasons", []):
        raise LmforgeError("generate: the output was cut by --max-new-tokens before the structure closed "
                           "(finish_reason length); raise --max-new-tokens")


def cmd_extract(a: argparse.Namespace) -> int:
    from lmforge.tasks.extract import ExtractConfig, extract, read_documents, read_schema

    read_schema(a.schema)  # bad inputs and flags fail before the model loads
    read_documents(a.data, a.field)
    gen_kwargs(a)
    gen = load_generator(a.model, a.quantize, a.dtype, a.device)
    c = ExtractConfig(schema=a.schema, data=a.data, output=a.output, field=a.field, id_field=a.id_field,
                      batch_size=a.batch_size, truncate=a.truncate, generation=gen_kwargs(a))
    s = extract(c, gen, log=lambda m: print(m, file=sys.stderr))
    print(f"extract: {s['documents']} documents, {s['valid']} valid, {s['cut']} cut by --max-new-tokens, "
          f"{s['invalid']} invalid; wrote {s['output']}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("extract", help="fill a JSON schema from each document of a JSONL file (constrained "
                       "decoding, batched, resumable)", epilog=EPILOG)
    s.add_argument("--schema", required=True, metavar="FILE", help="JSON schema every output follows")
    s.add_argument("--data", required=True, metavar="FILE", help="JSONL, one document per line")
    s.add_argument("--field", default="text", help="the documents' text field")
    s.add_argument("--id-field", default="id", help="copied to each output row when a document has it")
    s.add_argument("--output", default=None, metavar="FILE",
                   help="output JSONL (default: DATA with .extracted.jsonl); an interrupted run keeps its finished "
                        "rows in FILE.partial, and the same command continues it")
    s.add_argument("--batch-size", type=positive_int, default=8, help="documents decoded together (left-padded)")
    add_gen_flags(s, EXTRACT_DEFAULTS)
    s.set_defaults(func=cmd_extract)
