"""`lmforge extract`: fill a JSON schema from each document of a JSONL file, decoding under the schema as a
constraint (decoding/constraints.py), in batches, resumable like `eval` (PartialOutputs), each row validated with
jsonschema before it is written."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import DataError
from lmforge.io import atomic_write
from lmforge.tasks.evaluate import PartialOutputs, partial_key

INSTRUCTION = ("Extract the information asked for from the document below. Answer with one JSON object that "
               "follows this JSON schema:\n{schema}")


@dataclass
class ExtractConfig:
    schema: str  # JSON schema file
    data: str  # JSONL, one document per line
    output: str | None = None  # default: <data>.extracted.jsonl next to the data
    field: str = "text"  # the document's field
    id_field: str = "id"  # copied to the output row when present
    batch_size: int = 8
    truncate: bool = False  # a document too long for the context keeps its last tokens instead of failing
    # GenerationConfig fields (max_new_tokens, temperature, seed, ...)
    generation: dict[str, Any] = dataclasses.field(default_factory=lambda: {"max_new_tokens": 256})


def read_schema(path: str | Path) -> dict[str, Any]:
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"--schema {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise DataError(f"--schema {path}: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise DataError(f"--schema {path}: a JSON schema is an object, got {type(schema).__name__}")
    try:
        import jsonschema
    except ImportError:
        raise DataError("extract needs jsonschema: pip install jsonschema") from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise DataError(f"--schema {path}: not a valid JSON schema ({e.message})") from None
    return schema


def read_documents(path: str | Path, field: str) -> list[dict[str, Any]]:
    docs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"--data {path}: cannot read it ({e.strerror or e})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"--data {path}: line {n} is not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str) or not row[field].strip():
            raise DataError(f"--data {path}: line {n} has no non-empty string field {field!r} (--field)")
        docs.append(row)
    if not docs:
        raise DataError(f"--data {path}: no documents")
    return docs


def _kept_row(v: Any) -> str | None:
    """Why `v` is not a kept generation ({text, finish_reason}), else None (PartialOutputs' check)."""
    if not isinstance(v, dict) or set(v) != {"text", "finish_reason"} or not isinstance(v["text"], str) \
            or v["finish_reason"] not in ("stop", "length"):
        return '"text" is not {"text": str, "finish_reason": "stop" | "length"}'
    return None


def check_output(text: str, finish_reason: str, validator) -> tuple[Any, str | None]:
    """(parsed object or None, why it is not a valid extraction or None)."""
    if finish_reason == "length":
        return None, "cut by --max-new-tokens before the JSON closed"
    try:
        obj = json.loads(text)
    except ValueError as e:
        return None, f"not JSON ({e})"
    err = next(iter(validator.iter_errors(obj)), None)
    return (obj, None) if err is None else (None, f"does not follow the schema: {err.message}")


def extract(c: ExtractConfig, gen, log=print) -> dict[str, Any]:
    """Run the extraction -> a summary {documents, valid, cut, invalid, output}; rows go to c.output."""
    import jsonschema
    from tqdm import tqdm

    schema = read_schema(c.schema)
    docs = read_documents(c.data, c.field)
    out = Path(c.output) if c.output else Path(c.data).with_suffix(".extracted.jsonl")
    constraint = gen.constraints.compile("json_schema", schema)  # compile errors before any decoding
    system = INSTRUCTION.format(schema=json.dumps(schema))
    prompts = [gen.format_chat([{"role": "system", "content": system}, {"role": "user", "content": d[c.field]}])
               for d in docs]
    settings = [schema, sorted(c.generation.items())]
    kept = PartialOutputs(out, partial_key([gen.name], settings, prompts), len(prompts), log, "extract",
                          valid=_kept_row)
    todo = [i for i in range(len(prompts)) if i not in kept.done]
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="extract", unit="doc", disable=None)
    try:
        for s in range(0, len(todo), c.batch_size):
            idx = todo[s: s + c.batch_size]
            texts = gen.generate([prompts[i] for i in idx], add_special_tokens=False, truncate=c.truncate,
                                 **{**c.generation, "constraint": constraint})
            batch = {i: {"text": t, "finish_reason": r} for i, t, r in zip(idx, texts, gen.finish_reasons)}
            kept.keep(batch)
            kept.done.update(batch)
            bar.update(len(idx))
    except KeyboardInterrupt:
        kept.interrupted()
        raise
    finally:
        bar.close()
    validator = jsonschema.validators.validator_for(schema)(schema)
    rows, n_valid, n_cut = [], 0, 0
    for i, d in enumerate(docs):
        k = kept.done[i]
        obj, err = check_output(k["text"], k["finish_reason"], validator)
        n_valid += err is None
        n_cut += k["finish_reason"] == "length"
        rows.append({"index": i, **({"id": d[c.id_field]} if c.id_field in d else {}), "output": obj,
                     "valid": err is None, "error": err, "finish_reason": k["finish_reason"],
                     **({"text": k["text"]} if err is not None else {})})
    atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    kept.path.unlink(missing_ok=True)
    return {"documents": len(docs), "valid": n_valid, "cut": n_cut, "invalid": len(docs) - n_valid - n_cut,
            "output": str(out)}
