"""`export(model_or_run_dir, path, format, type)`: a trained model out to llama.cpp (GGUF) or transformers (HF).

Accepts a model in memory (a Transformer or task model, LoRA adapters or not) with its tokenizer, or anything
on disk lmforge makes or loads: a run dir (its best/ or final/ model), a HF dir, an adapters-only dir (merged
onto its base model), a GGUF file, a built-in name. Everything that can be checked before loading weights is.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoints import load_checkpoint, save_hf
from lmforge.checkpoints.gguf_write import GGUF_TYPES, ExportError, write_gguf

__all__ = ["ExportError", "FORMATS", "export"]

FORMATS = ("gguf", "hf")
_HF_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_HEAD_TASKS = ("ForSequenceClassification", "ForQuestionAnswering", "ForTokenClassification")
_NO_HEAD = "llama.cpp has no {what} head; export it with --format hf"


def export(model_or_run_dir: nn.Module | str | Path, path: str | Path, format: str = "gguf", type: str = "f16",
           tokenizer=None) -> Path:
    """Write the model as one GGUF file (format="gguf") or a HF directory (format="hf"); returns `path`.

    type: f32 | f16 | bf16 | q8_0 | q4_0 (quantized types are GGUF only). LoRA adapters are merged first.
    """
    path = Path(path)
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: unknown export format (choose from {', '.join(FORMATS)})")
    types = GGUF_TYPES if format == "gguf" else tuple(_HF_TYPES)
    if type not in types:
        why = "unknown type" if type not in GGUF_TYPES else "quantized types are for --format gguf only"
        raise ExportError(f"--type {type!r}: {why} (choose from {', '.join(types)})")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: output directory {path.parent} does not exist")

    if isinstance(model_or_run_dir, nn.Module):
        source = f"<{model_or_run_dir.__class__.__name__}>"
        if format == "gguf":
            _check_no_head(model_or_run_dir, source)
        model = _merged(model_or_run_dir)
        backbone = getattr(model, "backbone", model)
        heads = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")} \
            if model is not backbone else {}
        tok = tokenizer
    else:
        source = str(model_or_run_dir)
        model_path = _model_path(model_or_run_dir)
        if format == "gguf":
            _check_dir_for_gguf(model_path, source)
        backbone, tok, heads = _load(model_path)
        tok = tokenizer or tok

    if format == "gguf":
        if heads:
            raise ExportError(f"{source}: holds task-head tensors ({', '.join(sorted(heads))}); "
                              + _NO_HEAD.format(what="task"))
        name = Path(source).name if not source.startswith("<") else "lmforge export"
        return write_gguf(path, backbone.cfg, backbone.state_dict(), tok, type=type, name=name, source=source)
    dtype = _HF_TYPES[type]
    body = {k: v.to(dtype) for k, v in backbone.state_dict().items()}
    save_hf(path, backbone.cfg, body, {k: v.to(dtype) for k, v in heads.items()} or None, tokenizer=tok)
    return path


# ---- finding the model --------------------------------------------------------------------------
def _has_model(d: Path) -> bool:
    return (d / "config.json").is_file() or (d / "adapter_config.json").is_file()


def _model_path(src: str | Path) -> str | Path:
    """A run dir -> its chosen model dir (summary.json's model_dir, else best/, else final/); others as given."""
    p = Path(src)
    if not p.is_dir() or _has_model(p):
        return src if p.exists() else str(src)  # a file, a model dir, or a built-in name / hub id to resolve
    try:
        chosen = json.loads((p / "summary.json").read_text()).get("model_dir")
    except (OSError, ValueError, AttributeError):
        chosen = None
    for d in ([Path(chosen)] if chosen else []) + [p / "best", p / "final"]:
        if d.is_dir() and _has_model(d):
            return d
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    what = "run dir" if any(p.glob("*_config.json")) or (p / "checkpoints").is_dir() else "directory"
    raise ExportError(f"{p}: {what} has no model weights (no config.json, best/ or final/ model, or .gguf file); "
                      "train to the end first or point at a model directory")


def _check_dir_for_gguf(model_path: str | Path, source: str) -> None:
    """Refuse task models with a head llama.cpp cannot run, before loading any weights."""
    d = Path(model_path)
    if not d.is_dir():
        return
    run = d.parent if d.name in ("best", "final") else d
    for task, what in (("classify", "sequence-classification"), ("qa", "question-answering")):
        if (run / f"{task}_config.json").is_file():
            raise ExportError(f"{source}: a {what} run; " + _NO_HEAD.format(what=what))
    for name in ("config.json", "adapter_config.json"):
        try:
            cfg = json.loads((d / name).read_text())
        except (OSError, ValueError):
            continue
        archs = " ".join(cfg.get("architectures") or [])
        task = cfg.get("task_type", "")
        if "ForSequenceClassification" in archs or task == "SEQ_CLS":
            raise ExportError(f"{source}: a sequence-classification model; "
                              + _NO_HEAD.format(what="sequence-classification"))
        if any(h in archs for h in _HEAD_TASKS) or task in ("QUESTION_ANS", "TOKEN_CLS"):
            raise ExportError(f"{source}: a task model ({archs or task}); " + _NO_HEAD.format(what="task"))


def _check_no_head(model: nn.Module, source: str) -> None:
    if hasattr(model, "score"):
        raise ExportError(f"{source}: a sequence-classification model; "
                          + _NO_HEAD.format(what="sequence-classification"))
    if hasattr(model, "qa_outputs"):
        raise ExportError(f"{source}: a question-answering model; " + _NO_HEAD.format(what="question-answering"))


def _load(model_path: str | Path) -> tuple[nn.Module, object, dict[str, torch.Tensor]]:
    """A model dir / file / name -> (backbone with adapters merged, tokenizer, task-head tensors)."""
    d = Path(model_path)
    if d.is_dir() and (d / "adapter_config.json").is_file() and not (d / "config.json").is_file():
        from lmforge.checkpoints.peft import load_adapters
        from lmforge.tokenizer import Tokenizer

        base = json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ExportError(f"{d / 'adapter_config.json'}: no base_model_name_or_path to merge the adapters onto")
        ck = load_checkpoint(base)
        model = ck.model
        load_adapters(model, d)
        tok = Tokenizer.from_dir(d) if (d / "tokenizer.json").is_file() else ck.tokenizer
        return _merged(model), tok, {}
    ck = load_checkpoint(model_path)
    return ck.model, ck.tokenizer, ck.heads


def _merged(model: nn.Module) -> nn.Module:
    """LoRA merged into a copy (the caller's model keeps its adapters); the model itself when it has none."""
    from lmforge.model.lora import has_lora, merge_lora

    return merge_lora(copy.deepcopy(model), inplace=True) if has_lora(model) else model
