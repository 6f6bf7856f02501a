"""The server's LoRA adapters over its one base model: reading adapter dirs, slots, and load/unload at run time.

An adapter is a lmforge LoRA run dir trained with `--lora --save-adapters-only` (its root, best/ or final/) or a
plain PEFT LoRA dir. A `lmforge finetune` adapter generates (a request names it in `model`); a `lmforge classify
train` adapter (adapters + its `score` head) answers /v1/classify. Every adapter runs on the server's own base
model (lmforge.model.multi_lora): no second copy of the base, and one batch mixes rows of different adapters.

Unloading an adapter that rows still use drains it: new requests for it are refused at once (404), the rows
already admitted (queued or running) finish with it, and its slot is freed when the last one ends. Loading a
name that is still draining is a 409.

Files are read with lmforge.checkpoints.peft.load_adapters onto a shadow of the base built on the meta device
(its linear weights zero-stride views: no memory), so every check of that reader applies (another base's shapes,
a rank that does not match the config, missing files) and the served model is never touched by a failed load.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import CheckpointError, LmforgeError
from lmforge.model.lora import LoraLinear, lora_candidates
from lmforge.model.multi_lora import (
    AdapterRef,
    AdapterRows,
    LayerAdapter,
    clear_slot,
    install_multi_lora,
    set_slot,
)
from lmforge.tasks.common import find_run_dir

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADAPTER_CONFIG = "adapter_config.json"  # lmforge.checkpoints.peft.ADAPTER_CONFIG
CLASSIFY_INFO = "classify.json"  # lmforge.tasks.classify.RUN_INFO


class AdapterError(LmforgeError):
    """An adapter request the server refuses; `status` is the HTTP answer (400, 404, 409)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ReadAdapter:
    """An adapter dir's tensors as the base's layers will hold them (backbone-relative names)."""

    path: Path
    layers: dict[str, LayerAdapter]
    rank: int
    head: dict[str, torch.Tensor] | None = None  # classifier: the score Linear's state dict
    labels: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # classify.json


def adapter_dir(path: str | Path) -> Path:
    """RUN_DIR, its best/ or final/: the first holding adapter_config.json; else one line saying why not."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such adapter directory")
    found = find_run_dir(p, ADAPTER_CONFIG)
    if found is not None and (found / ADAPTER_CONFIG).is_file():
        return found
    if (p / "config.json").is_file() or (p / "final" / "config.json").is_file():
        raise CheckpointError(f"{p}: holds a merged model, not LoRA adapters (train with --lora "
                              "--save-adapters-only, or serve it as its own --model)")
    raise CheckpointError(f"{p}: no {ADAPTER_CONFIG} here or in best/ or final/ (not a LoRA adapter dir)")


def shadow_of(cfg) -> nn.Module:
    """A Transformer of `cfg` without memory: meta tensors, and zero-stride CPU views for the adapter-capable
    linears (LoraLinear allocates its adapters on its base weight's device)."""
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        shadow = Transformer(copy.deepcopy(cfg))
    for m in lora_candidates(shadow).values():
        m.weight = nn.Parameter(torch.zeros(()).expand(m.out_features, m.in_features), requires_grad=False)
    return shadow


def read_adapter(path: str | Path, cfg) -> ReadAdapter:
    """Read an adapter dir against the base's config: LM adapters, or classifier adapters with their head."""
    from lmforge.checkpoints.peft import load_adapters
    from lmforge.model.heads import SequenceClassifier

    d = adapter_dir(path)
    shadow = shadow_of(cfg)
    info: dict[str, Any] = {}
    labels = None
    model: nn.Module = shadow
    if (d / CLASSIFY_INFO).is_file():
        info = json.loads((d / CLASSIFY_INFO).read_text())
        labels_f = d / "labels.json"
        if not labels_f.is_file():
            raise CheckpointError(f"{d}: a classifier adapter without labels.json")
        labels = json.loads(labels_f.read_text())
        if not isinstance(labels, list) or not labels:
            raise CheckpointError(f"{labels_f}: expected a non-empty JSON list of labels")
        model = SequenceClassifier(shadow, len(labels), info.get("pooling"))
    load_adapters(model, d)  # every check of the PEFT reader: shapes, ranks, names, missing files
    layers = {n: LayerAdapter(m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.scale)
              for n, m in shadow.named_modules() if isinstance(m, LoraLinear)}
    if not layers:
        raise CheckpointError(f"{d}: no LoRA tensors in the adapter")
    head = None
    if labels is not None:
        head = {k: v.detach().clone() for k, v in model.score.state_dict().items()}
    return ReadAdapter(d, layers, max(a.a.shape[0] for a in layers.values()), head, labels, info)


class ScopedClassifier(nn.Module):
    """A classifier adapter's head over the shared base: every call runs its rows with the adapter's slot (on the
    calling thread only), then puts the thread back on the base."""

    def __init__(self, head: nn.Module, rows: AdapterRows, slot: int) -> None:
        super().__init__()
        self.head, self.rows, self.slot = head, rows, slot

    def forward(self, *args, **kwargs) -> torch.Tensor:
        self.rows.use_all(self.slot)
        try:
            return self.head(*args, **kwargs)
        finally:
            self.rows.use(None)


@dataclass
class Adapter:
    """One loaded adapter: its slot in the base's layers and the rows that use it now."""

    name: str
    path: str
    ref: AdapterRef
    rank: int
    layers: int
    kind: str  # "generate" | "classify"
    classifier: Any = None  # lmforge.tasks.classify.LoadedClassifier (kind "classify")
    active: int = 0  # admitted rows (queued or running) that run with it
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def describe(self) -> dict[str, Any]:
        out = {"kind": self.kind, "rank": self.rank, "layers": self.layers, "running": self.active,
               "state": "draining" if self.draining else "ready"}
        if self.classifier is not None:
            out["labels"] = list(self.classifier.labels)
        return out


class AdapterManager:
    """Names -> adapters over one base model; thread-safe (loads come from handlers, releases from the worker)."""

    def __init__(self, model: nn.Module, tokenizer=None, max_adapters: int = 16) -> None:
        self.model, self.tokenizer, self.max_adapters = model, tokenizer, max_adapters
        p = next(model.parameters())
        self.device = p.device
        self.dtype = p.dtype if p.is_floating_point() else torch.float32
        self.rows = AdapterRows(self.device)
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time (reads are slow; slots and layers change)
        self._by_name: dict[str, Adapter] = {}
        self._keys = 0
        self.layers: dict = {}  # backbone-relative name -> MultiLoraLinear

    # -- queries
    def names(self) -> list[str]:
        with self._lock:
            return [n for n, a in self._by_name.items() if not a.draining]

    def get(self, name: str) -> Adapter | None:
        with self._lock:
            a = self._by_name.get(name)
            return None if a is None or a.draining else a

    def all(self) -> list[Adapter]:
        with self._lock:
            return list(self._by_name.values())

    # -- rows
    def acquire(self, name: str, kind: str = "generate") -> Adapter:
        """Count one more row of adapter `name` (refused if unknown, draining, or of the other kind)."""
        with self._lock:
            a = self._by_name.get(name)
            if a is None or a.draining:
                raise AdapterError(f"adapter '{name}' is not loaded" + (" (it is being unloaded)" if a else ""), 404)
            if a.kind != kind:
                raise AdapterError(f"adapter '{name}' is a {a.kind} adapter; it does not serve {kind} requests", 400)
            a.active += 1
            return a

    def release(self, a: Adapter) -> None:
        with self._lock:
            a.active -= 1
            if a.draining and a.active <= 0:
                self._free(a)

    # -- load / unload
    def load(self, name: str, path: str | Path) -> Adapter:
        """Read, check and install an adapter under `name`; the base model stays as it was on any error."""
        if not isinstance(name, str) or not NAME.match(name):
            raise AdapterError(f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (no ':' or '/')")
        with self._load_lock:
            with self._lock:
                old = self._by_name.get(name)
                if old is not None:
                    what = "is being unloaded (its rows are finishing)" if old.draining else "is already loaded"
                    raise AdapterError(f"adapter '{name}' {what}", 409)
                used = {a.ref.slot for a in self._by_name.values()}
                if len(used) >= self.max_adapters:
                    raise AdapterError(f"adapter '{name}': {len(used)} adapters are loaded, this server's limit is "
                                       f"{self.max_adapters} (unload one first)", 409)
            try:
                r = read_adapter(path, self.model.cfg)
            except LmforgeError as e:
                raise AdapterError(f"adapter '{name}': {e}", 400) from None
            classifier = None
            with self._lock:
                slot = min(set(range(1, self.max_adapters + 1)) - {a.ref.slot for a in self._by_name.values()})
                self._keys += 1
                ref = AdapterRef(name, slot, self._keys)
            layers = install_multi_lora(self.model, set(r.layers), self.rows, self.dtype)
            set_slot(layers, slot, r.layers)
            self.layers = layers
            if r.head is not None:
                classifier = self._classifier(r, slot)
            a = Adapter(name, str(path), ref, r.rank, len(r.layers), "classify" if r.head is not None else "generate",
                        classifier)
            with self._lock:
                self._by_name[name] = a
            return a

    def _classifier(self, r: ReadAdapter, slot: int):
        from lmforge.model.heads import SequenceClassifier
        from lmforge.tasks.classify import LoadedClassifier
        from lmforge.tokenizer import Tokenizer

        head = SequenceClassifier(self.model, len(r.labels or []), r.info.get("pooling"))
        head.score.load_state_dict(r.head)
        head.score.to(device=self.device, dtype=self.dtype)
        head.eval()
        tok = Tokenizer.from_dir_if_present(r.path) or self.tokenizer
        if tok is None or tok.pad_id is None:
            raise AdapterError(f"{r.path}: no tokenizer with a pad or eos token to batch classification inputs")
        return LoadedClassifier(ScopedClassifier(head, self.rows, slot).eval(), tok, list(r.labels or []),
                                "transformer", int(r.info.get("max_length", 256)),
                                r.info.get("padding_side", "right"), {**r.info, "run_dir": str(r.path)})

    def unload(self, name: str) -> Adapter:
        """Stop admitting rows for `name`; free its slot now, or when its running rows have finished."""
        with self._lock:
            a = self._by_name.get(name)
            if a is None or a.draining:
                raise AdapterError(f"adapter '{name}' is not loaded" + (" (already being unloaded)" if a else ""), 404)
            a.draining = True
            if a.active <= 0:
                self._free(a)
            return a

    def _free(self, a: Adapter) -> None:  # under self._lock, no row runs it
        clear_slot(self.layers, a.ref.slot)
        self._by_name.pop(a.name, None)
