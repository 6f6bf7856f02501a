"""A scheduler that runs concurrent generation requests as one continuous batch on one worker thread.

Why a single worker thread: model work must stay off the event loop (so /health and new connections are
answered during a long generation), and one thread owning the model means one forward at a time, which
is what a CPU (or one GPU) does best anyway; concurrency comes from batching, not from threads.

Continuous batching: while rows decode, new requests wait in a FIFO queue; before each decode
step the worker admits every waiting request that fits (`max_batch` rows, `max_batch_tokens` positions),
prefills each alone (reusing a cached prompt prefix when one matches, see serve/prefix_cache.py), gives it
its first token and merges it into the running batch (serve/engine.py: left-padding whichever side is shorter).
Prefill is chunked: each worker iteration runs prefill chunks of joining prompts (FIFO) up to `prefill_chunk`
tokens (at least one chunk), then one decode step of the running rows, so a long prompt delays the running
streams by about one chunk's time per token, not by its whole prefill.

Batch invariance (`batch_invariant`, on by default): a row's tokens and logprobs do not depend on which other
rows share its steps (serve/engine.py, lmforge/model/invariant.py; guarantees and costs: docs/serving.md).
A row leaves the batch as soon as it ends: its stop string, EOS or max_tokens, or its client going away
(`cancel`, seen at the next step). Each row has its own sampling parameters, stop strings, max_tokens and
logprobs request; a seeded row has its own torch.Generator (choice j of a request with seed s uses
`engine.row_seed(s, j)`), so the same seed gives the same texts whatever else the server is doing.

Log-probabilities (`SamplingParams.logprobs`) are those of the model's own distribution: log_softmax of the
raw float32 logits at each step, before repetition penalty, temperature and top-k/top-p/min-p (as vLLM
reports them), for every counted completion token (the stop token that ends a row is not one).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from lmforge.decoding.constraints import BatchMasker
from lmforge.decoding.step import DecodeRuntime
from lmforge.decoding.stream import TextStreamer
from lmforge.errors import LmforgeError
from lmforge.model.cache import KVCache
from lmforge.model.multi_lora import AdapterRows
from lmforge.serve.engine import DEFAULT_PREFILL_CHUNK, PREFIX_GRAIN, BatchDecoder, PrefillJob, RowSampler, row_seed
from lmforge.serve.prefix_cache import PrefixCache
from lmforge.serve.requests import (
    Event,
    GenRequest,
    Overloaded,
    ShuttingDown,
    TokenLogprob,
)
from lmforge.serve.scoring import ScoreRequest, score_prompts, take_batch
from lmforge.serve.speculate import Speculator

log = logging.getLogger("lmforge.serve")


@dataclass(eq=False)
class _Row:
    """A request decoding in the continuous batch: its sampler, its text streamer, the token to feed next."""

    req: GenRequest
    sampler: RowSampler
    streamer: TextStreamer
    next: int = 0


class Scheduler:
    """Admission control (max_batch generating + max_queue waiting, beyond that Overloaded) and the worker."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64, max_batch_tokens: int = 1 << 17,
                 metrics=None, prefix_cache_bytes: int = 0, compile: str = "auto",
                 runtime: DecodeRuntime | None = None, lora: AdapterRows | None = None,
                 batch_invariant: bool = True, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefix_grain: int = PREFIX_GRAIN, speculative: str = "auto") -> None:
        """batch_invariant: a row's numbers never depend on the other rows (engine.BatchDecoder `invariant`);
        prefill_chunk: prompt tokens per prefill forward and per worker iteration (0: a whole prompt at once);
        prefix_grain: the chunk grid's step for prompts shorter than a chunk (engine.BatchDecoder.grid).
        lora: the model's multi-LoRA row slots (serve/adapters.py), so rows run their SamplingParams.adapter.
        runtime: the model's DecodeRuntime to share (e.g. `Generator.runtime`, so the server reuses the traces
        the Generator made); None builds one for this scheduler. speculative: what a request's speculative="auto"
        means ("auto" | "off" | "prompt-lookup": a lone greedy row's prompt-lookup rounds, serve/speculate.py)."""
        if max_batch < 1 or max_queue < 0:
            raise LmforgeError(f"max_concurrent must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_batch_tokens = max_batch_tokens  # rows x (prompt + new) positions: bounds the KV cache size
        self.context_length = model.cfg.context_length
        self.eos = set(model.cfg.eos_ids)
        self._cond = threading.Condition()
        self._waiting: deque[GenRequest] = deque()
        self._running: set[GenRequest] = set()
        self._scoring: deque[ScoreRequest] = deque()  # prompts to score (echo), run between decode steps
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy_s = 0.0  # EMA of batch wall time: the Retry-After estimate
        self._chunk_s = math.inf  # EMA of a full prefill chunk's wall time: prefill time per iteration (_prefill_some)
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "max_rows": 0, "reused_tokens": 0}
        self.metrics = metrics  # optional observer: batch(rows), first_token(seconds) (serve/metrics.py)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.prefill_chunk = prefill_chunk
        self._engine = BatchDecoder(model, self.prefix_cache, compile=compile, runtime=runtime, lora=lora,
                                    invariant=batch_invariant, prefill_chunk=prefill_chunk, max_rows=max_batch,
                                    prefix_grain=prefix_grain)
        self._masks: BatchMasker | None = None  # constrained rows' masks, computed while the model steps
        # how constrained rows get their masks: "thread" (filled together on a worker thread during the forward),
        # "batched" (the same fill, in line), "row" (each row its own, after the logits: the earlier path), "auto"
        # (thread when torch's threads leave two cores free: on a 2-core host the worker cost more than the mask
        # even beside one compute thread; benchmarks/structured.py measures the modes side by side)
        self.mask_mode = "auto"
        self._spec = Speculator(speculative, self._engine, self.stats)

    # ---- admission (any thread) ---------------------------------------------------------------------
    @property
    def batch_invariant(self) -> bool:
        """Whether rows' numbers are independent of the batch (asked for, and on a CPU: docs/serving.md)."""
        return self._engine.invariant

    @property
    def decode_step(self) -> str:
        """The step batch-1 decoding ran last ("traced (...)" or "eager (why)"); batches of several rows: eager."""
        return self._engine.path

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def batch_rows(self) -> int:
        """Rows in the continuous batch's KV cache now (a left row is gone from it after the next step)."""
        return self._engine.rows

    def submit(self, req: GenRequest) -> None:
        self.submit_many([req])

    def submit_many(self, reqs: list[GenRequest]) -> None:
        """All or none: a request's n choices are admitted together, and queue next to each other."""
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._running) + len(self._waiting) + len(reqs) > self.max_batch + self.max_queue:
                raise Overloaded(f"server busy: {len(self._running)} generations running and "
                                 f"{len(self._waiting)} queued (limits {self.max_batch} and {self.max_queue}); "
                                 "retry later", self.retry_after())
            groups: dict[int, int] = {}
            for r in reqs:  # the n choices of a seeded request: 0, 1, ... (each its own generator)
                if r.params.seed is not None and r.params.group is not None:
                    r.choice = groups.get(r.params.group, 0)
                    groups[r.params.group] = r.choice + 1
            self._waiting.extend(reqs)
            self._cond.notify_all()
        self.start()

    def cancel(self, req: GenRequest) -> None:
        """The client went away: free its slot now; the worker drops its row at the next step."""
        with self._cond:
            req.cancelled = True
            try:
                self._waiting.remove(req)
            except ValueError:
                pass
            self._running.discard(req)
            self._cond.notify_all()

    def submit_score(self, reqs: list[ScoreRequest]) -> None:
        """Prompts to score (echo): the worker runs them between decode steps; they share the queue's limit."""
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._scoring) + len(reqs) > self.max_batch + self.max_queue:
                raise Overloaded(f"server busy: {len(self._scoring)} prompts waiting to be scored (limit "
                                 f"{self.max_batch + self.max_queue}); retry later", self.retry_after())
            self._scoring.extend(reqs)
            self._cond.notify_all()
        self.start()

    def retry_after(self) -> int:
        return int(min(60, max(1, math.ceil(self._busy_s or 1.0))))

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="lmforge-generate", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._waiting)
            self._waiting.clear()
            scoring = list(self._scoring)
            self._scoring.clear()
            self._cond.notify_all()
        for r in pending:
            self._finish_error(r, ShuttingDown("the server is shutting down"))
        for q in scoring:
            q.finished = True
            q.done(None, ShuttingDown("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- worker --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        """Continuous batching: waiting requests join the running batch before each decode step."""
        rows: list[_Row] = []
        pending: list[tuple[_Row, PrefillJob]] = []  # admitted, prefill under way
        try:
            while True:
                with self._cond:
                    while not self._waiting and not rows and not pending and not self._scoring and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        break
                    joiners = self._admit(rows + [row for row, _ in pending])
                    scoring = take_batch(self._scoring)
                if scoring:
                    self._score(scoring)
                try:
                    if joiners and not rows and not pending:
                        self.stats["batches"] += 1
                    pending += [j for r in joiners if (j := self._begin(r)) is not None]
                    if pending:
                        prefilled = self._prefill_some(pending)
                        self._engine.join([(cache, row.req.prompt_ids) for row, cache in prefilled],
                                          [row.req.params.adapter for row, _ in prefilled])
                        rows += [row for row, _ in prefilled]
                        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
                        if self.metrics is not None:
                            self.metrics.batch(len(rows))
                    busy = bool(pending or self._waiting or self._scoring)  # a lone row speculates when not busy
                    if rows and not self._spec.round(rows, busy, self._deliver, self._drop):
                        self._decode_step(rows)
                except Exception as e:  # a failed step fails the running rows, never the worker
                    log.exception("decode step of %d rows failed", len(rows))
                    for row in rows:
                        self._finish_error(row.req, e)
                    rows.clear()
                    self._engine.reset()
        finally:
            for row in rows + [row for row, _ in pending]:
                self._finish_error(row.req, ShuttingDown("the server is shutting down"))
            self._engine.reset()

    def _score(self, reqs: list[ScoreRequest]) -> None:
        """One scoring forward for these prompts (serve/scoring.py); a failure fails them, never the worker."""
        try:
            results = score_prompts(self.model, [q.prompt_ids for q in reqs], [q.top for q in reqs])
        except Exception as e:
            log.exception("scoring %d prompts failed", len(reqs))
            results, error = [None] * len(reqs), e
        else:
            error = None
        for q, res in zip(reqs, results):
            q.finished = True
            try:
                q.done(res, error)
            except Exception:  # the receiving event loop is gone (shutdown): nothing to tell
                pass

    def _admit(self, rows: list[_Row]) -> list[GenRequest]:
        """Waiting requests (FIFO) that fit next to the running rows (max_batch rows, max_batch_tokens)."""
        out: list[GenRequest] = []
        span = max((len(x.req.prompt_ids) + x.req.params.max_tokens for x in rows), default=0)
        while self._waiting and len(rows) + len(out) < self.max_batch:
            r = self._waiting[0]
            s = max(span, len(r.prompt_ids) + r.params.max_tokens)
            if (rows or out) and (len(rows) + len(out) + 1) * s > self.max_batch_tokens:
                break
            self._waiting.popleft()
            self._running.add(r)
            out.append(r)
            span = s
        return out

    def _begin(self, r: GenRequest) -> tuple[_Row, PrefillJob] | None:
        """A request's row (sampler, streamer) and its prefill job, unless it was cancelled or fails to start."""
        if r.cancelled:
            return None
        p = r.params
        try:
            r.started_at = time.monotonic()
            sampler = RowSampler(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                                 repetition_penalty=p.repetition_penalty,
                                 seed=None if p.seed is None else row_seed(p.seed, r.choice),
                                 prompt_ids=r.prompt_ids, vocab_size=self.model.cfg.vocab_size,
                                 device=self._engine.device,
                                 constraint=None if p.constraint is None else p.constraint.matcher(sorted(self.eos)))
            row = _Row(r, sampler, TextStreamer(self._decode, list(p.stop)))
            job = self._engine.begin_prefill(r.prompt_ids, p.adapter)
            self.stats["reused_tokens"] += job.reused
            return row, job
        except Exception as e:  # a failed prefill fails its request, never the batch
            log.exception("prefill of a %d-token prompt failed", len(r.prompt_ids))
            self._finish_error(r, e)
        return None

    def _prefill_some(self, pending: list[tuple[_Row, PrefillJob]]) -> list[tuple[_Row, KVCache]]:
        """Prefill chunks of the pending prompts, first come first, up to `prefill_chunk` tokens in all and about
        one full chunk's time (at least one call; one that would go past the budget waits for the next iteration, so
        several prompts admitted at once, or short prompts run in `prefix_grain` pieces, hold the running rows for
        about one chunk, not one chunk each); the prompts that finish get their first token -> the rows to join
        (those that did not end)."""
        budget = self.prefill_chunk or math.inf
        out: list[tuple[_Row, KVCache]] = []
        ran, t0, per_token = False, time.monotonic(), 0.0
        while pending:
            row, job = pending[0]
            r = row.req
            if r.cancelled:
                pending.pop(0)
                continue
            k = self._engine.next_chunk(job)
            if ran and (k > budget or time.monotonic() - t0 + k * per_token > self._chunk_s):
                break  # over the tokens, or (at the last call's time per token) over one full chunk's time
            try:
                ran = True
                t = time.monotonic()
                k = self._engine.prefill_chunk(job)
                budget -= k
                dt = time.monotonic() - t
                per_token = dt / k
                if k == self.prefill_chunk:  # a full chunk: how long one takes (EMA), the iteration's time limit
                    self._chunk_s = dt if self._chunk_s == math.inf else 0.8 * self._chunk_s + 0.2 * dt
                if job.logits is None:
                    continue
                pending.pop(0)
                if self._first(row, job):
                    out.append((row, job.cache))
            except Exception as e:  # a failed prefill fails its request, never the batch
                pending.pop(0)
                log.exception("prefill of a %d-token prompt failed", len(r.prompt_ids))
                self._finish_error(r, e)
        return out

    @torch.inference_mode()
    def _first(self, row: _Row, job: PrefillJob) -> bool:
        """A prefilled request's first token; False when it ended there. Its prompt's keys/values go to the prefix
        cache now when they are exactly what a fresh prefill computes (engine.reuse_exact), else when it ended."""
        r, p, logits = row.req, row.req.params, job.logits  # (1, V)
        logp = logits.log_softmax(-1) if p.logprobs is not None else None
        tok = int(logits.argmax(-1)) if row.sampler.plain_greedy else row.sampler(logits)
        self.stats["rows"] += 1
        going = self._deliver(row, tok, None if logp is None else logp[0])
        if self.prefix_cache is not None and (self._engine.reuse_exact or not (going or self.batch_invariant)):
            n, cache = len(r.prompt_ids), job.cache
            # no copy: the prompt's columns of a prefill cache are never written again (the row decodes past them)
            self.prefix_cache.store(r.prompt_ids, [t[0, :, :n] for t in cache.k], [t[0, :, :n] for t in cache.v],
                                    self._engine.cache_ns(p.adapter, n), copy=False)
        return going

    @torch.inference_mode()
    def _decode_step(self, rows: list[_Row]) -> None:
        """One token for every running row; rows that end (or whose client left) leave the batch."""
        gone = [b for b, row in enumerate(rows) if row.req.cancelled or row.req.finished]
        self._drop(rows, gone, store=False)
        if not rows:
            return
        steps_left = max(row.req.params.max_tokens - row.req.completion_tokens for row in rows)
        # constrained rows: their masks are filled on the mask thread while the model runs this step
        mode = self.masks_run()
        masked = self._masker().start([row.sampler.constraint for row in rows], background=mode == "thread") \
            if mode != "row" and any(row.sampler.constraint is not None for row in rows) else False
        logits = self._engine.step([row.next for row in rows], steps_left)  # (B, V)
        logp = None
        if any(row.req.params.logprobs is not None for row in rows):
            # invariant: one call per row, so each row's reduction is the call a lone row makes
            logp = (torch.cat([logits[b: b + 1].log_softmax(-1) for b in range(len(rows))]) if self.batch_invariant
                    else logits.log_softmax(-1))  # (B, V)
        if masked:  # after logp: logprobs are the model's own distribution
            logits = self._masks.apply(logits)  # (B, V): -inf on each constrained row's blocked tokens
        greedy = None
        if any(row.sampler.plain_greedy or (masked and row.sampler.greedy) for row in rows):
            # one batched argmax (numpy's on a CPU: a tenth of torch's single-threaded one over a 49k vocabulary)
            greedy = (logits.numpy() if logits.device.type == "cpu" else logits).argmax(-1).tolist()
        ended = []
        for b, row in enumerate(rows):
            if row.req.cancelled:
                ended.append(b)
                continue
            tok = greedy[b] if row.sampler.plain_greedy else \
                row.sampler(logits[b: b + 1], masked, greedy[b] if masked and greedy is not None else None)
            if not self._deliver(row, tok, None if logp is None else logp[b]):
                ended.append(b)
        self._drop(rows, ended, store=True)

    def masks_run(self) -> str:
        """The mask mode in effect ("auto" resolved): see `mask_mode`."""
        if self.mask_mode != "auto":
            return self.mask_mode
        return "thread" if torch.get_num_threads() + 2 <= (os.cpu_count() or 1) else "batched"

    def _masker(self) -> BatchMasker:
        """The constrained rows' mask filler (made at the first constrained step: a server without one never
        imports the constraint library)."""
        if self._masks is None:
            self._masks = BatchMasker()
        return self._masks

    def _drop(self, rows: list[_Row], idx: list[int], store: bool) -> None:
        if not idx:
            return
        if store and self.prefix_cache is not None and not self.batch_invariant:  # (invariant: prompts only, _first)
            for b in idx:
                if not rows[b].req.cancelled:
                    self.prefix_cache.store(*self._engine.row_kv(b), self._engine.row_ns(b))
        self._engine.drop(idx)
        for b in sorted(idx, reverse=True):
            del rows[b]

    def _deliver(self, row: _Row, tok: int, logp: torch.Tensor | None) -> bool:
        """Hand one sampled token to its request (text, logprobs, the end); False when the row is done."""
        r, streamer = row.req, row.streamer
        if r.first_token_at is None:  # the first step (even an immediate EOS): time to first token
            r.first_token_at = time.monotonic()
            if self.metrics is not None:
                self.metrics.first_token(r.first_token_at - r.enqueued_at)
        if tok in self.eos:
            if r.params.stop_logprob and r.params.logprobs is not None and logp is not None:
                top = logp.topk(min(r.params.logprobs, logp.shape[-1])) if r.params.logprobs > 0 else None
                alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                r.pending_logprobs.append(TokenLogprob(tok, float(logp[tok]), alts))
            self._finish(r, streamer, "stop")
            return False
        r.completion_tokens += 1
        self.stats["tokens"] += 1
        k = r.params.logprobs
        if k is not None and logp is not None:
            top = logp.topk(min(k, logp.shape[-1])) if k > 0 else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            r.pending_logprobs.append(TokenLogprob(tok, float(logp[tok]), alts))
        piece = streamer.put(tok)
        if piece:
            self._emit(r, Event("text", piece, logprobs=self._take_logprobs(r)))
        if streamer.stopped or r.completion_tokens >= r.params.max_tokens:
            self._finish(r, streamer, "stop" if streamer.stopped else "length")
            return False
        row.next = tok
        return True

    def _decode(self, t: list[int]) -> str:
        return self.tokenizer.decode(t, skip_special_tokens=True)

    # ---- results ---------------------------------------------------------------------------------------
    def _emit(self, r: GenRequest, ev: Event) -> None:
        try:
            r.emit(ev)
        except Exception:  # the receiving event loop is gone (shutdown): nothing to tell
            r.cancelled = True

    @staticmethod
    def _take_logprobs(r: GenRequest) -> list[TokenLogprob] | None:
        if r.params.logprobs is None:
            return None
        out, r.pending_logprobs = r.pending_logprobs, []
        return out

    def _finish(self, r: GenRequest, streamer, reason: str) -> None:
        tail = streamer.end()
        if tail or r.pending_logprobs:  # held-back text, or tokens whose text a stop string cut away
            self._emit(r, Event("text", tail, logprobs=self._take_logprobs(r)))
        r.finished, r.finished_at = True, time.monotonic()
        if r.started_at is not None:  # Retry-After: how long a row holds its slot
            dt = r.finished_at - r.started_at
            self._busy_s = dt if not self._busy_s else 0.8 * self._busy_s + 0.2 * dt
        self._emit(r, Event("done", finish_reason=reason, completion_tokens=r.completion_tokens))
        with self._cond:  # its slot is free as soon as its answer is complete
            self._running.discard(r)

    def _finish_error(self, r: GenRequest, e: BaseException) -> None:
        if r.finished:
            return
        r.finished = True
        self._emit(r, Event("error", error=e, completion_tokens=r.completion_tokens))
