"""Sequence classification: data -> features -> model (encoder, decoder, LoRA or GloVe) -> Trainer -> run dir.

A run directory is a Hugging Face model directory (config.json with id2label, model.safetensors,
tokenizer files) at its root, plus the trainer's files (metrics.jsonl, curves.png, checkpoints/, best/,
final/) and labels.json; AutoModelForSequenceClassification loads the root for bert/llama/gpt2/gemma3.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data import datasets, readers
from lmforge.data.bounds import clip_for_tokens
from lmforge.data.readers import Example
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.tasks.common import (
    LoraArgs,
    TaskRun,
    apply_lora,
    check_quantized_base,
    check_resumable,
    check_validation,
    export_model,
    find_run_dir,
    quantize_base,
    run_training,
    write_json,
)
from lmforge.train.batching import pad_batch

GLOVE = "glove-6b-50d"
RUN_INFO = "classify.json"


EVAL_METRICS = ("accuracy", "macro_f1", "eval_loss")


@dataclass
class ClassifyConfig(LoraArgs):
    """What to train on and how to build the model; the loop's own knobs are in TrainConfig."""

    model: str = "minilm-l6"
    data: str = "tweets-sentiment"
    eval_data: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    encoding: str | None = None
    strict: bool = False
    eval_fraction: float = 0.1  # validation split carved from the training data when no eval_data
    max_length: int = 64
    pooling: str | None = None  # last | cls | mean; default: last for decoders, cls for encoders
    padding_side: str = "right"
    max_train_samples: int | None = None
    max_eval_samples: int | None = 1000
    # measured on tweets (docs/benchmarks.md): r16 on every linear at lr 1e-3 beat r8 on q,v at 2e-4 by 13.8 points
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: str = "all-linear"
    glove_hidden: int = 256
    # LoRA over a frozen int base: none (float), auto (a quantized GGUF's own blocks), 8 | 4 (quantized at load)
    quantize: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- data ------------------------------------------------------------------------------------------
def _read(path: str, c: ClassifyConfig) -> readers.ReadResult:
    return readers.read_examples(path, text_column=c.text_column, label_column=c.label_column,
                                 text_pair_column=c.text_pair_column, encoding=c.encoding, strict=c.strict)


def load_data(c: ClassifyConfig, seed: int = 42) -> tuple[list[Example], list[Example], list[str], dict]:
    """-> (train, validation, labels, info). Built-in datasets validate on a slice of their train split."""
    info: dict[str, Any] = {"data": c.data}
    if datasets.is_builtin(c.data):
        train, _test, meta = datasets.load_builtin(c.data)
        info.update(builtin=True, description=meta.get("description"))
        evals = None
    else:
        r = _read(c.data, c)
        train, info["skipped_empty"] = r.examples, r.skipped_empty
        evals = None
        if c.eval_data:
            re_ = _read(c.eval_data, c)
            evals = re_.examples
    labels = readers.build_label_map(train, c.data)
    if evals is None:
        train, evals = readers.stratified_split(train, c.eval_fraction, seed=seed)
        info["validation"] = f"stratified {c.eval_fraction:.0%} of the training data"
    else:
        readers.check_eval_labels(evals, labels, c.eval_data)
        info["validation"] = str(c.eval_data)
    if c.max_train_samples:
        train = stratified_head(train, c.max_train_samples, seed)
    if c.max_eval_samples:
        evals = stratified_head(evals, c.max_eval_samples, seed)
    info.update(train_examples=len(train), eval_examples=len(evals))
    return train, evals, labels, info


def stratified_head(examples: list[Example], n: int, seed: int) -> list[Example]:
    """A deterministic, class-balanced-as-the-data subset of n examples."""
    if n >= len(examples):
        return examples
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    return [examples[i] for i in sorted(order[:n])]


def load_eval_examples(data: str, c: ClassifyConfig, limit: int | None = None) -> list[Example]:
    """Examples to evaluate on: a built-in dataset's fixed test split, or a file."""
    if datasets.is_builtin(data):
        _train, test, _meta = datasets.load_builtin(data)
        ex = test
    else:
        ex = _read(data, c).examples
    return stratified_head(ex, limit, 0) if limit else ex


# ---- features ----------------------------------------------------------------------------------------
def encode(tokenizer, examples: list[Example], label_ids: dict[str, int] | None, max_length: int,
           glove: bool = False) -> list[dict[str, Any]]:
    """Token ids (unpadded) + label id for each example; padding happens per batch (dynamic). Texts are cut by
    characters before tokenizing, to what `max_length` tokens need (data/bounds.py)."""
    feats: list[dict[str, Any]] = []
    if glove:
        joined = [e.text if e.text_pair is None else f"{e.text} {e.text_pair}" for e in examples]
        joined = clip_for_tokens(joined, max_length, lambda ts: [len(tokenizer.encode(t)) for t in ts])
        for e, text in zip(examples, joined):
            ids = tokenizer.encode(text, max_length) or [tokenizer.pad_id]
            feats.append({"input_ids": ids, "label": label_ids[e.label] if label_ids else -1})
        return feats

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer.encode_batch(texts, add_special_tokens=False, truncation=False,
                                                           padding=False, return_tensors=None)["input_ids"]]

    texts = clip_for_tokens([e.text for e in examples], max_length, count)
    pairs = [e.text_pair for e in examples] if any(e.text_pair is not None for e in examples) else None
    if pairs is not None:
        pairs = clip_for_tokens([p or "" for p in pairs], max_length, count)
    for s in range(0, len(examples), 1024):
        chunk = examples[s: s + 1024]
        enc = tokenizer.encode_batch(texts[s: s + 1024], pairs=None if pairs is None else pairs[s: s + 1024],
                                     max_length=max_length, padding=False, return_tensors=None)
        for i, e in enumerate(chunk):
            f = {"input_ids": enc["input_ids"][i], "label": label_ids[e.label] if label_ids else -1}
            if "token_type_ids" in enc:
                f["token_type_ids"] = enc["token_type_ids"][i]
            feats.append(f)
    return feats


def make_collate(pad_id: int, side: str = "right"):
    def collate(feats: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([f["input_ids"] for f in feats], pad_id, side=side)
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": torch.tensor([f["label"] for f in feats], dtype=torch.long)}
        if "token_type_ids" in feats[0]:
            batch["token_type_ids"], _ = pad_batch([f["token_type_ids"] for f in feats], 0, side=side)
        return batch
    return collate


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    return F.cross_entropy(logits.float(), batch["labels"]), int(batch["labels"].shape[0])


@torch.inference_mode()
def predict_logits(model: nn.Module, feats: list[dict[str, Any]], collate, batch_size: int = 64) -> torch.Tensor:
    """(N, num_labels) logits in the original order; batches of similar length so padding stays small."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    out: torch.Tensor | None = None
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        b = collate([feats[i] for i in idx])
        logits = model(b["input_ids"].to(dev), b["attention_mask"].to(dev),
                       None if "token_type_ids" not in b else b["token_type_ids"].to(dev)).float().cpu()
        if out is None:
            out = torch.empty(len(feats), logits.shape[-1])
        out[idx] = logits
    model.train(was_training)
    assert out is not None
    return out


# ---- models ------------------------------------------------------------------------------------------
def build_model(c: ClassifyConfig, num_labels: int, labels: list[str], log=print):
    """-> (model, tokenizer, kind) where kind is 'transformer' or 'glove'."""
    check_quantized_base(c.quantize, c)
    if c.model == GLOVE:
        if c.quantize != "none":
            raise ConfigError(f"--quantize {c.quantize}: {GLOVE} has no transformer base to quantize")
        from lmforge.tasks.glove import GloveClassifier, load_glove

        tok, vectors = load_glove()
        return GloveClassifier(vectors, num_labels, hidden=c.glove_hidden), tok, "glove"
    from lmforge.checkpoints import load_checkpoint
    from lmforge.model.heads import SequenceClassifier

    ck = load_checkpoint(c.model, quantized=c.quantize == "auto")
    if ck.tokenizer is None:
        raise ConfigError(f"{c.model}: has no tokenizer files, cannot classify text")
    cfg = ck.cfg
    if c.max_length > cfg.context_length:
        raise ConfigError(f"--max-length {c.max_length} is above the model's context length {cfg.context_length} "
                          f"({c.model})")
    tok = ck.tokenizer
    if tok.pad_id is None:
        raise ConfigError(f"{c.model}: tokenizer has neither a pad nor an eos token to pad batches with")
    cfg.pad_token_id = tok.pad_id  # HF's classifier finds the last token through it
    cfg.id2label = dict(enumerate(labels))
    model = SequenceClassifier(ck.model, num_labels, c.pooling)
    model.train()
    held = quantize_base(ck.model, c.quantize) if c.quantize != "none" else None
    if held is not None:  # the head stays float and trains with the adapters
        log(f"base: {held}, frozen; LoRA adapters and the head train in float32 and save alone (PEFT format)")
        c.save_adapters_only = True  # int blocks cannot hold a merged update
    apply_lora(model, c)
    return model, tok, "transformer"


def save_classifier(model: nn.Module, tok, kind: str, labels: list[str], c: ClassifyConfig, path: Path) -> None:
    """Write an exportable model dir: HF format (merged LoRA unless adapters-only), or the GloVe head."""
    path = Path(path)
    if kind == "glove":
        model.save(path, labels)
    else:
        export_model(model, path, tok, c, c.model, extra_config={"lmforge_pooling": model.pooling})
    write_json(path / "labels.json", labels)
    info = {"kind": kind, "max_length": c.max_length, "pooling": getattr(model, "pooling", "mean"),
            "base_model": c.model, "lora": c.lora, "adapters_only": bool(c.lora and c.save_adapters_only),
            "padding_side": c.padding_side}
    write_json(path / RUN_INFO, info)


# ---- training ----------------------------------------------------------------------------------------
def train(c: ClassifyConfig, tc, resume: bool = False, log=print) -> dict[str, Any]:
    """Train a classifier; returns a summary (run dir, validation report, timings)."""
    from lmforge.metrics import classification_report
    from lmforge.train.trainer import seed_everything

    if resume:
        check_resumable(Path(tc.output_dir))
    if c.padding_side not in ("left", "right"):
        raise ConfigError(f"--padding-side must be left or right, got {c.padding_side!r}")
    train_ex, eval_ex, labels, info = load_data(c, seed=tc.seed)
    for group in readers.case_collisions(labels):
        log(f"warning: labels {', '.join(map(repr, group))} differ only by case; they train as {len(group)} separate "
            "classes (make them one spelling in the data to merge them)")
    check_validation(len(eval_ex), "classify")
    label_ids = {lab: i for i, lab in enumerate(labels)}
    seed_everything(tc.seed)
    model, tok, kind = build_model(c, len(labels), labels, log)
    glove = kind == "glove"
    t0 = time.perf_counter()
    train_feats = encode(tok, train_ex, label_ids, c.max_length, glove)
    eval_feats = encode(tok, eval_ex, label_ids, c.max_length, glove)
    log(f"data: {len(train_feats)} train / {len(eval_feats)} validation examples, {len(labels)} labels "
        f"({', '.join(labels)}); tokenized in {time.perf_counter() - t0:.1f}s")
    if info.get("skipped_empty"):
        log(f"data: skipped {info['skipped_empty']} rows with empty text (use --strict to fail instead)")
    collate = make_collate(tok.pad_id, "right" if glove else c.padding_side)

    def eval_fn(m: nn.Module) -> dict[str, float]:
        logits = predict_logits(m, eval_feats, collate)
        y = torch.tensor([f["label"] for f in eval_feats])
        rep = classification_report(y.tolist(), logits.argmax(-1).tolist(), labels)
        return {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"],
                "eval_loss": float(F.cross_entropy(logits, y))}

    run = TaskRun("classify", c.to_dict(), model, train_feats, classification_loss,
                  save_fn=lambda m, d, _sd: save_classifier(m, tok, kind, labels, c, d),
                  eval_fn=eval_fn, eval_metrics=EVAL_METRICS, n_eval=len(eval_feats), collate_fn=collate,
                  lengths=[len(f["input_ids"]) for f in train_feats],
                  find_unused_parameters=True,  # e.g. the pooler under mean pooling
                  summary={"labels": labels, "data": info})
    return run_training(run, tc, resume=resume)


# ---- loading a trained classifier -------------------------------------------------------------------------
@dataclass
class LoadedClassifier:
    model: nn.Module
    tokenizer: Any
    labels: list[str]
    kind: str
    max_length: int
    padding_side: str = "right"
    info: dict = field(default_factory=dict)


def load_classifier(run_dir: str | Path, device: str = "cpu") -> LoadedClassifier:
    """A run dir (or its best/ or final/) -> model ready to predict."""
    p = find_run_dir(run_dir, RUN_INFO)
    if p is None:
        raise CheckpointError(f"{run_dir}: not a classifier run directory (no {RUN_INFO}; train one with "
                              "`lmforge classify train`)")
    info = json.loads((p / RUN_INFO).read_text())
    labels = json.loads((p / "labels.json").read_text())
    if info["kind"] == "glove":
        from lmforge.tasks.glove import GloveClassifier

        model, tok, labels = GloveClassifier.load(p)
        return LoadedClassifier(model.to(device), tok, labels, "glove", info["max_length"], "right", info)
    from lmforge.checkpoints import load_checkpoint
    from lmforge.checkpoints.hf import load_into
    from lmforge.model.heads import SequenceClassifier

    if info.get("adapters_only"):
        from lmforge.checkpoints.peft import load_adapters
        from lmforge.tokenizer import Tokenizer

        ck = load_checkpoint(info["base_model"], device=device)
        ck.cfg.id2label = dict(enumerate(labels))
        model = SequenceClassifier(ck.model, len(labels), info.get("pooling"))
        load_adapters(model, p)
        tok = Tokenizer.from_dir(p)
    else:
        ck = load_checkpoint(p, device=device)
        model = SequenceClassifier(ck.model, len(labels), info.get("pooling"))
        head = {k: v for k, v in ck.heads.items() if k.startswith("score.")}
        if not head:
            raise CheckpointError(f"{p}: no classifier head tensors (score/classifier) in the checkpoint")
        load_into(model.score, {k.split(".", 1)[1]: v for k, v in head.items()}, str(p))
        tok = ck.tokenizer
    return LoadedClassifier(model.eval().to(device), tok, labels, "transformer", info["max_length"],
                            info.get("padding_side", "right"), info)


def predict(lc: LoadedClassifier, texts: list[str], batch_size: int = 64,
            pairs: list[str] | None = None) -> list[dict[str, Any]]:
    examples = [Example(t, None, None if pairs is None else pairs[i]) for i, t in enumerate(texts)]
    feats = encode(lc.tokenizer, examples, None, lc.max_length, lc.kind == "glove")
    collate = make_collate(lc.tokenizer.pad_id, lc.padding_side)
    probs = predict_logits(lc.model, feats, collate, batch_size).softmax(-1)
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"label": lc.labels[best], "score": round(row[best], 6),
                    "probabilities": {lab: round(p, 6) for lab, p in zip(lc.labels, row)}})
    return out


def evaluate(lc: LoadedClassifier, examples: list[Example], batch_size: int = 64) -> dict[str, Any]:
    from lmforge.metrics import classification_report

    unknown = sorted({e.label for e in examples} - set(lc.labels))
    if unknown:
        raise DataError(f"evaluation data has label(s) {unknown} that the model was not trained on "
                        f"(its labels: {lc.labels})")
    label_ids = {lab: i for i, lab in enumerate(lc.labels)}
    feats = encode(lc.tokenizer, examples, label_ids, lc.max_length, lc.kind == "glove")
    collate = make_collate(lc.tokenizer.pad_id, lc.padding_side)
    t0 = time.perf_counter()
    logits = predict_logits(lc.model, feats, collate, batch_size)
    dt = time.perf_counter() - t0
    rep = classification_report([f["label"] for f in feats], logits.argmax(-1).tolist(), lc.labels)
    rep["examples"] = len(feats)
    rep["samples_per_s"] = round(len(feats) / max(dt, 1e-9), 1)
    return rep
