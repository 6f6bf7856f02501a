"""Prometheus metrics for `GET /metrics` (the text exposition format, through prometheus-client).

One CollectorRegistry per app, never the library's global one: several apps live in one process (tests,
notebooks), and each must count only its own requests. The Gate middleware records every request (status,
endpoint, duration, tokens); the scheduler records batch sizes and times to first token; queue depth and
running rows are read from the scheduler when scraped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from lmforge.serve.batching import Scheduler

# the endpoints a label may name; anything else (scanners, typos) is "other", so labels stay few
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/classify",
             "/v1/summarize", "/v1/translate", "/v1/answer", "/health", "/metrics", "/")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def endpoint_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models"
    if path.startswith("/static/"):
        return "/static"
    return path if path in ENDPOINTS else "other"


class Metrics:
    """The server's counters, gauges and histograms, all in one registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("lmforge_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt (input) tokens of answered requests",
                                     ["endpoint"], registry=r)
        self.completion_tokens = Counter("lmforge_completion_tokens", "Generated (output) tokens", ["endpoint"],
                                         registry=r)
        self.latency = Histogram("lmforge_request_duration_seconds", "Time from request to the end of the "
                                 "response (streams: the last event)", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Time from a generation entering the queue "
                              "to its first token (queue wait + prefill + one step)", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.batch_size = Histogram("lmforge_batch_size",
                                    "Rows decoding together, observed each time requests join the running batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("lmforge_queue_depth", "Generations waiting for a batch", registry=r)
        self.running = Gauge("lmforge_running", "Generations decoding now (rows of the running batch)",
                             registry=r)
        # speculative rounds of lone greedy rows (serve/speculate.py), totals since start read from the scheduler
        self.speculative = {k: Gauge(f"lmforge_speculative_{k}", help_, registry=r) for k, help_ in (
            ("rounds", "Speculative rounds run (one verifying forward each) since start"),
            ("drafted", "Prompt-lookup draft tokens verified since start"),
            ("accepted", "Draft tokens the model agreed with (kept) since start"))}

    def watch(self, sched: Scheduler) -> None:
        """Queue depth and running rows are read from the scheduler at scrape time."""
        self.queue_depth.set_function(lambda: sched.waiting)
        self.running.set_function(lambda: sched.running)
        for k, g in self.speculative.items():
            g.set_function(lambda k=k: sched.stats.get(f"spec_{k}", 0))

    # -- called by the Gate middleware (event loop) and the scheduler's worker thread
    def request(self, path: str, status: int | None, seconds: float, tokens_in: int, tokens_out: int) -> None:
        ep = endpoint_label(path)
        self.requests.labels(ep, str(status) if status else "none").inc()  # none: no answer began
        self.latency.labels(ep).observe(seconds)
        if tokens_in:
            self.prompt_tokens.labels(ep).inc(tokens_in)
        if tokens_out:
            self.completion_tokens.labels(ep).inc(tokens_out)

    def batch(self, rows: int) -> None:
        self.batch_size.observe(rows)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
