"""ServerState: what every handler shares (`request.app.state.lmforge`): the models, the settings, the
scheduler, the auxiliary thread, and the checks that turn a request's limits into 4xx answers."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lmforge.serve.adapters import AdapterError, AdapterManager
from lmforge.serve.batching import Scheduler
from lmforge.serve.errors import ApiError
from lmforge.serve.logprobs import LogprobFormatter
from lmforge.serve.metrics import Metrics
from lmforge.serve.requests import Overloaded
from lmforge.serve.settings import Embedder, ServeSettings, server_compile


class ServerState:
    """Models, limits, the scheduler and the auxiliary thread (embeddings, classification) of one app."""

    def __init__(self, generator, embedder: Embedder | None, classifier, settings: ServeSettings) -> None:
        self.generator, self.embedder, self.classifier, self.settings = generator, embedder, classifier, settings
        self.ctx = generator.model.cfg.context_length
        self.max_prompt = min(settings.max_prompt_tokens or self.ctx - 1, self.ctx - 1)
        self.metrics = Metrics()
        # LoRA adapters over the generator's model (serve/adapters.py): layers are wrapped at the first load
        self.adapters = AdapterManager(generator.model, generator.tokenizer, settings.max_adapters)
        self.sched = Scheduler(generator.model, generator.tokenizer, max_batch=settings.max_concurrent,
                               max_queue=settings.max_queue, metrics=self.metrics,
                               prefix_cache_bytes=settings.prefix_cache_mb << 20,
                               compile=server_compile(generator.compile),
                               batch_invariant=settings.batch_invariant, prefill_chunk=settings.prefill_chunk,
                               prefix_grain=settings.prefix_grain or settings.prefill_chunk,
                               speculative=settings.speculative,
                               runtime=generator.runtime,  # the Generator's traces serve here too
                               lora=self.adapters.rows)
        self.metrics.watch(self.sched)
        self.logprobs = LogprobFormatter(generator.tokenizer)
        self.aux = ThreadPoolExecutor(1, thread_name_prefix="lmforge-aux")  # embeddings, classification
        self.aux_lock = threading.Lock()
        self.aux_active = 0
        self.started = time.time()
        self.model_id = settings.model_name or short_name(getattr(generator, "name", "") or "lmforge")
        self.base_names = {self.model_id, getattr(generator, "name", "") or self.model_id}
        self.gen_path = getattr(generator, "name", "") or None  # where it was loaded from (sentence_budget)
        if embedder is not None:
            self.emb_id = settings.embedder_name or short_name(embedder.name)
            self.emb_names = {self.emb_id, embedder.name}
        else:
            self.emb_id, self.emb_names = self.model_id, self.gen_names
        if classifier is not None:
            name = settings.classifier_name or short_name(str(classifier.info.get("run_dir", "") or "classifier"))
            self.cls_id, self.cls_names = name, {name}
        else:
            self.cls_id, self.cls_names = None, set()

    # -- adapters
    @property
    def gen_names(self) -> set[str]:
        """Names a generation request may give in `model`: the base's, and each generation adapter as NAME or
        BASE:NAME."""
        names = set(self.base_names)
        for a in self.adapters.all():
            if not a.draining and a.kind == "generate":
                names |= {a.name, *(f"{b}:{a.name}" for b in self.base_names)}
        return names

    def adapter_for(self, requested: str | None) -> str | None:
        """The adapter a request's `model` names (NAME or BASE:NAME), None for the base (or no adapter)."""
        if not requested or requested in self.base_names:
            return None
        for b in self.base_names:
            if requested.startswith(b + ":"):
                requested = requested[len(b) + 1:]
                break
        return requested if self.adapters.get(requested) is not None else None

    def load_adapter(self, name: str, path: str):
        """Load an adapter under a name no other model of this server has (AdapterError otherwise)."""
        if name in self.base_names | self.cls_names | self.emb_names:
            raise AdapterError(f"adapter name '{name}' is already a model name of this server", 409)
        return self.adapters.load(name, path)

    def reply_model(self, requested: str | None) -> str:
        """The `model` a reply names: the adapter that ran, else the base."""
        return self.adapter_for(requested) or self.model_id

    # -- checks
    def check_model(self, requested: str | None, names: set[str], what: str) -> None:
        if requested is None or requested in names:
            return
        served = sorted(m["id"] for m in self.models())
        raise ApiError(404, f"model '{requested}' is not served here for {what} (served: {', '.join(served)})",
                       "model", "model_not_found")

    def check_max_tokens(self, requested: int | None, param: str = "max_tokens") -> None:
        if requested is not None and requested > self.settings.max_tokens:
            raise ApiError(400, f"{param} {requested} exceeds this server's limit of {self.settings.max_tokens}",
                           param, "max_tokens_too_large")

    def resolve_max_tokens(self, requested: int | None, n_prompt: int, param: str = "max_tokens") -> int:
        room = self.ctx - n_prompt
        if requested is not None:
            if requested > room:
                raise ApiError(400, f"prompt of {n_prompt} tokens + {param} {requested} exceeds the model's "
                                    f"context length of {self.ctx}", param, "context_length_exceeded")
            return requested
        return max(1, min(self.settings.default_max_tokens, room))

    def check_prompt(self, n: int, param: str) -> None:
        if n == 0:
            raise ApiError(400, f"'{param}' is empty: give some text", param, "empty_prompt")
        if n > self.max_prompt:
            raise ApiError(400, f"prompt of {n} tokens is longer than this server's limit of {self.max_prompt} "
                                "tokens", param, "prompt_too_long")

    def models(self) -> list[dict[str, Any]]:
        created = int(self.started)
        out = [{"id": self.model_id, "object": "model", "created": created, "owned_by": "lmforge",
                "context_length": self.ctx}]
        if self.embedder is not None:
            out.append({"id": self.emb_id, "object": "model", "created": created, "owned_by": "lmforge"})
        if self.classifier is not None:
            out.append({"id": self.cls_id, "object": "model", "created": created, "owned_by": "lmforge",
                        "labels": list(self.classifier.labels)})
        for a in self.adapters.all():  # vLLM's shape for LoRA modules: the base is the parent
            if not a.draining:
                out.append({"id": a.name, "object": "model", "created": a.created, "owned_by": "lmforge",
                            "parent": self.model_id, "adapter": a.describe(),
                            **({"labels": list(a.classifier.labels)} if a.classifier is not None else {})})
        return out

    # -- model work off the event loop
    async def in_aux(self, fn: Callable, *args):
        with self.aux_lock:
            if self.aux_active >= self.settings.max_concurrent + self.settings.max_queue:
                raise Overloaded(f"server busy: {self.aux_active} embedding/classification requests in flight", 1)
            self.aux_active += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.aux, fn, *args)
        finally:
            with self.aux_lock:
                self.aux_active -= 1

    async def encode(self, text: str, special: bool) -> list[int]:
        return await asyncio.to_thread(self.generator.tokenizer.encode, text, special)

    async def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        def render() -> list[int]:
            text = self.generator.format_chat(messages)
            return self.generator.tokenizer.encode(text, add_special_tokens=False)

        return await asyncio.to_thread(render)

    async def close(self) -> None:
        await asyncio.to_thread(self.sched.close)
        self.aux.shutdown(wait=False, cancel_futures=True)


def short_name(name: str) -> str:
    """A path's last part (ids in /v1/models need not show the server's folders); names stay as they are."""
    if os.sep in name or name.endswith(".gguf"):
        return Path(name).name or name
    return name
