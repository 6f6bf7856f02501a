"""`export(model_or_run_dir, path, format, type)`: a trained model out to llama.cpp (GGUF) or transformers (HF).

Accepts a model in memory (a Transformer or task model, LoRA adapters or not) with its tokenizer, or anything
on disk lmforge makes or loads: a run dir (its best/ or final/ model), a HF dir, an adapters-only dir (merged
onto its base model), a GGUF file, a built-in name. Everything that can be checked before loading weights is.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoints import load_checkpoint, save_hf
from lmforge.checkpoints.gguf_write import GGUF_TYPES, ExportError, write_gguf
from lmforge.io import DISK_CAUSES, TMP_PREFIX, atomic_dir, disk_errno, fsync_path

__all__ = ["ExportError", "ExportWriteError", "FORMATS", "export"]

FORMATS = ("gguf", "hf", "gguf-lora")
_HF_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_HEAD_TASKS = ("ForSequenceClassification", "ForQuestionAnswering", "ForTokenClassification")
_NO_HEAD = "llama.cpp has no {what} head; export it with --format hf"


class ExportWriteError(ExportError):
    """The output could not be written (a full disk, a quota, a read-only file system, no permission); the
    partial output was removed."""


def export(model_or_run_dir: nn.Module | str | Path, path: str | Path, format: str = "gguf", type: str = "f16",
           tokenizer=None, log: Callable[[str], None] | None = None) -> Path:
    """Write the model as one GGUF file (format="gguf") or a HF directory (format="hf"), or its LoRA adapters
    alone as a GGUF LoRA adapter (format="gguf-lora": export_gguf_lora, type f32 | f16); returns `path`.

    type: f32 | f16 | bf16 | q8_0 | q4_0 (quantized types are GGUF only). LoRA adapters are merged first.
    `path` must be a new path or an existing regular file (gguf) / directory (hf); a symbolic link is followed
    and its target written, which `log` (default: stderr) says. A write that fails (a full disk, a quota, a
    read-only file system) raises ExportWriteError naming `path` and leaves no partial output.
    """
    path = Path(path)
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: unknown export format (choose from {', '.join(FORMATS)})")
    if format == "gguf-lora":
        return export_gguf_lora(model_or_run_dir, path, type, log)
    types = GGUF_TYPES if format == "gguf" else tuple(_HF_TYPES)
    if type not in types:
        why = "unknown type" if type not in GGUF_TYPES else "quantized types are for --format gguf only"
        raise ExportError(f"--type {type!r}: {why} (choose from {', '.join(types)})")
    target = check_output(path, format, log or (lambda m: print(m, file=sys.stderr)))

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
        with write_reported(path, target):
            write_gguf(target, backbone.cfg, backbone.state_dict(), tok, type=type, name=name, source=source)
        return path
    dtype = _HF_TYPES[type]
    body = {k: v.to(dtype) for k, v in backbone.state_dict().items()}
    hf_heads = {k: v.to(dtype) for k, v in heads.items()} or None
    with write_reported(path, target):
        write_hf_dir(target, lambda d: save_hf(d, backbone.cfg, body, hf_heads, tokenizer=tok))
    return path


def export_gguf_lora(model_or_run_dir: nn.Module | str | Path, path: Path, type: str = "f32",
                     log: Callable[[str], None] | None = None) -> Path:
    """The LoRA adapters alone as a GGUF LoRA adapter (llama.cpp's `--lora` over the base file): from a model in
    memory, or an adapters-only dir / run dir (loaded onto its recorded base, held quantized: no float copy)."""
    from lmforge.checkpoints.gguf_lora import LORA_TYPES, write_gguf_lora

    if type not in LORA_TYPES:
        raise ExportError(f"--type {type!r}: a GGUF LoRA adapter is written as {' or '.join(LORA_TYPES)}")
    target = check_output(path, "gguf", log or (lambda m: print(m, file=sys.stderr)))
    base = None
    if isinstance(model_or_run_dir, nn.Module):
        model, source = model_or_run_dir, f"<{model_or_run_dir.__class__.__name__}>"
    else:
        source = str(model_or_run_dir)
        d = Path(_model_path(model_or_run_dir))
        if not (d.is_dir() and (d / "adapter_config.json").is_file()):
            raise ExportError(f"{source}: holds no LoRA adapter files (adapter_config.json); --format gguf-lora "
                              "exports a LoRA run saved with --save-adapters-only (or --quantize)")
        _check_dir_for_gguf(d, source)
        from lmforge.checkpoints.peft import load_adapters

        base = json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ExportError(f"{d / 'adapter_config.json'}: no base_model_name_or_path to read the layers from")
        model = load_checkpoint(base, tokenizer=False, quantized=True).model
        load_adapters(model, d)
    _check_no_head(model, source)
    with write_reported(path, target):
        write_gguf_lora(target, model, type=type, name=Path(source).name if base else "lmforge LoRA",
                        source=source, base_model=base)
    return path


# ---- the output path -----------------------------------------------------------------------------
_NOT_A_FILE = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def check_output(path: Path, format: str, log: Callable[[str], None]) -> Path:
    """The path to write: `path`, or the target of a symbolic link (said through `log`). Refuses devices,
    FIFOs and sockets (writing there would replace them or block), a directory for a GGUF file and a file
    for a HF directory, each error naming `path` as given."""
    target = path
    if path.is_symlink():
        try:
            target = path.resolve(strict=False)
        except (OSError, RuntimeError) as e:  # a loop of links
            raise ExportError(f"{path}: a symbolic link that does not resolve ({e})") from None
    what = f"{path}: a symbolic link to {target}, which is" if target != path else f"{path}: is"
    try:
        st = os.stat(target)
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise ExportError(f"{path}: output directory {target.parent} does not exist") from None
        st = None
    except OSError as e:
        raise ExportError(f"{path}: cannot use as the output ({e.strerror or e})") from None
    if st is not None:
        for test, kind in _NOT_A_FILE:
            if test(st.st_mode):
                raise ExportError(f"{what} {kind}; export writes only a regular file or a new path")
        if format == "gguf" and stat.S_ISDIR(st.st_mode):
            raise ExportError(f"{what} a directory; --format gguf writes one file: give a file name, e.g. "
                              f"{path / 'model.gguf'}")
        if format == "hf" and not stat.S_ISDIR(st.st_mode):
            raise ExportError(f"{what} a file; --format hf writes a directory: give a directory or a new path")
    if target != path:
        log(f"export: {path} is a symbolic link: writing its target {target}")
    return target


@contextlib.contextmanager
def write_reported(path: Path, target: Path) -> Iterator[None]:
    """OS failures while writing `target` -> ExportWriteError naming `path` (as the user gave it) and the cause;
    the writers below have already removed their partial output."""
    try:
        yield
    except ExportError:
        raise
    except Exception as e:
        code = disk_errno(e, target.parent)
        if code is not None:
            cause = DISK_CAUSES[code]
        elif isinstance(e, OSError) and e.errno is not None:
            cause = os.strerror(e.errno).lower()
        else:
            raise
        raise ExportWriteError(f"{path}: cannot write the export: {cause}; nothing was left behind") from e


def write_hf_dir(path: Path, write: Callable[[Path], None]) -> None:
    """`write(dir)` into a temp dir, then in place: a new `path` is the temp dir renamed; into an existing
    directory each file is renamed in (config.json last, other files left alone). A failure leaves nothing."""
    if not path.exists():
        with atomic_dir(path) as tmp:
            write(tmp)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}export-", dir=path))  # inside: same file system
    try:
        write(tmp)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(f, path / f.name)
        fsync_path(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
