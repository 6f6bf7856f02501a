"""QA models: a pretrained encoder with a new span head, saved as a Hugging Face directory plus qa.json, and
loaded back (one run, or several as an ensemble) with the settings it was trained with."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.tasks.common import find_run_dir, write_json
from lmforge.tasks.qa.config import RUN_INFO, QAConfig
from lmforge.tasks.qa.data import PairTemplate, pair_template
from lmforge.tasks.qa.postprocess import SELECTIONS

_ARCH = {"bert": "BertForQuestionAnswering", "modernbert": "ModernBertForQuestionAnswering"}


def build_model(c: QAConfig):
    """-> (SpanHead, tokenizer): the pretrained encoder with a new qa_outputs layer."""
    from lmforge.checkpoints import load_checkpoint
    from lmforge.model.heads import SpanHead
    from lmforge.model.transformer import set_dropout

    ck = load_checkpoint(c.model)
    if ck.cfg.family not in _ARCH:
        raise ConfigError(f"{c.model}: extractive QA needs a bidirectional encoder (bert, modernbert); this is a "
                          f"{ck.cfg.family} model")
    if ck.tokenizer is None:
        raise ConfigError(f"{c.model}: has no tokenizer files, cannot tokenize questions")
    if c.max_length > ck.cfg.context_length:
        raise ConfigError(f"QAConfig.max_length {c.max_length} is above the model's context length "
                          f"{ck.cfg.context_length} ({c.model})")
    if ck.tokenizer.pad_id is None:
        raise ConfigError(f"{c.model}: tokenizer has neither a pad nor an eos token to pad batches with")
    if not 0.0 <= c.dropout < 1.0:
        raise ConfigError(f"QAConfig.dropout must be in [0, 1), got {c.dropout}")
    model = SpanHead(ck.model)
    set_dropout(model, c.dropout, attention=False)
    nn.init.normal_(model.qa_outputs.weight, std=0.02)
    nn.init.zeros_(model.qa_outputs.bias)
    model.train()
    return model, ck.tokenizer


def save_qa(model: nn.Module, tok, info: dict[str, Any], path: str | Path) -> None:
    """HF directory (loads in AutoModelForQuestionAnswering) + qa.json with the windowing settings."""
    from lmforge.checkpoints import save_pretrained

    path = Path(path)
    arch = _ARCH.get(model.backbone.cfg.family)
    save_pretrained(model, path, tokenizer=tok, extra_config={"architectures": [arch]} if arch else None)
    write_json(path / RUN_INFO, info)


@dataclass
class LoadedQA:
    model: nn.Module  # SpanHead
    tokenizer: Any
    max_length: int = 384
    doc_stride: int = 128
    max_question_length: int = 64
    max_answer_length: int = 30
    n_best: int = 20
    answer_selection: str = "expected-f1"
    info: dict = field(default_factory=dict)
    template: PairTemplate | None = None
    members: list[nn.Module] = field(default_factory=list)  # more SpanHeads whose logits are averaged with model's


def load_qa(run_dir: str | Path, device: str = "cpu") -> LoadedQA:
    """A qa run dir (or its best/ or final/), or any HF bert directory with qa_outputs tensors (a
    ModernBertForQuestionAnswering directory: its `classifier`)."""
    from lmforge.checkpoints import load_checkpoint
    from lmforge.checkpoints.hf import load_into
    from lmforge.model.heads import SpanHead

    p = find_run_dir(run_dir, RUN_INFO) or Path(run_dir)  # or a plain HF directory
    if not (p / RUN_INFO).exists() and not (p / "config.json").exists():
        raise CheckpointError(f"{p}: not a question-answering run directory (no {RUN_INFO} or config.json; "
                              "train one with `lmforge qa train`)")
    info: dict[str, Any] = {}
    if (p / RUN_INFO).exists():
        try:
            info = json.loads((p / RUN_INFO).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p / RUN_INFO}: not valid JSON ({e.msg} at line {e.lineno})") from None
    ck = load_checkpoint(p, device=device)
    if ck.tokenizer is None:
        raise CheckpointError(f"{p}: no tokenizer files")
    head = {k.split(".", 1)[1]: v for k, v in ck.heads.items() if k.startswith("qa_outputs.")}
    if not head and _is_modernbert_qa(p):  # ModernBertForQuestionAnswering names its span layer `classifier`
        head = {k.split(".", 1)[1]: v for k, v in ck.heads.items() if k.startswith("score.")}
    if not head:
        raise CheckpointError(f"{p}: no qa_outputs tensors (not a question-answering model; train one with "
                              "`lmforge qa train`)")
    model = SpanHead(ck.model)
    load_into(model.qa_outputs, head, str(p))
    defaults = QAConfig()
    settings = {k: int(info.get(k, getattr(defaults, k)))
                for k in ("max_length", "doc_stride", "max_question_length", "max_answer_length", "n_best")}
    settings["max_length"] = min(settings["max_length"], ck.cfg.context_length)
    settings["answer_selection"] = str(info.get("answer_selection", "max"))  # runs saved before it existed: max
    if settings["answer_selection"] not in SELECTIONS:
        raise CheckpointError(f"{p / RUN_INFO}: answer_selection must be one of {', '.join(SELECTIONS)}, got "
                              f"{settings['answer_selection']!r}")
    return LoadedQA(model.eval().to(device), ck.tokenizer, **settings, info=info,
                    template=pair_template(ck.tokenizer))


def _is_modernbert_qa(p: Path) -> bool:
    try:
        hf = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return hf.get("model_type") == "modernbert" and "ModernBertForQuestionAnswering" in (hf.get("architectures") or [])


ENSEMBLE_KEYS = ("max_length", "doc_stride", "max_question_length")  # what makes two runs' windows the same


def load_qa_ensemble(run_dirs: Sequence[str | Path], device: str = "cpu") -> LoadedQA:
    """Several qa runs that answer as one: their start and end logits are averaged on the same windows.

    Why: models trained on different data orders or splits make partly independent span errors, and the
    average scores higher out of domain than either (docs/qa.md). The runs must share the tokenizer and the
    windowing; the answer settings (n_best, max_answer_length, answer_selection) are the first run's.
    """
    if not run_dirs:
        raise ConfigError("qa: no model given")
    first, *rest = (load_qa(d, device) for d in run_dirs)
    for d, other in zip(run_dirs[1:], rest):
        if other.tokenizer.backend.to_str() != first.tokenizer.backend.to_str():
            raise CheckpointError(f"{d}: its tokenizer differs from {run_dirs[0]}'s; an ensemble needs one "
                                  "tokenizer")
        for k in ENSEMBLE_KEYS:
            if getattr(other, k) != getattr(first, k):
                raise CheckpointError(f"{d}: {k} {getattr(other, k)} differs from {run_dirs[0]}'s "
                                      f"{getattr(first, k)}; an ensemble needs the same windows")
        first.members.append(other.model)
    return first
