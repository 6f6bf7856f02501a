"""`lmforge serve`: load a generator (and optionally a classifier and an embedder), serve them over HTTP.

fastapi/uvicorn are imported only when the verb runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lmforge.cli.common import DEFAULT_LM, DEVICE_HELP, load_generator, non_negative_int, positive_int
from lmforge.errors import LmforgeError
from lmforge.serve.settings import SERVER_COMPILE, is_loopback


def register(sub: argparse._SubParsersAction) -> None:
    from lmforge.decoding import AUTO_TRACE_STEPS

    s = sub.add_parser(
        "serve", help="serve a model over HTTP: OpenAI-compatible API, task endpoints and a chat page",
        description="Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, "
                    "/v1/classify, /v1/summarize, /v1/translate, /v1/answer, /health, and a chat page at /.")
    s.add_argument("--model", default=DEFAULT_LM, help="text-generation model")
    s.add_argument("--classifier", default=None, metavar="RUN_DIR",
                   help="a `lmforge classify train` run directory, for /v1/classify and the page's classify box")
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_DIR",
                   help="serve a LoRA adapter over the --model base as NAME (repeatable): a `--lora "
                        "--save-adapters-only` run dir of finetune (generation: a request names it in 'model', as "
                        "NAME or BASE:NAME) or of classify train (/v1/classify), or a PEFT LoRA dir. More load and "
                        "unload at run time: POST/DELETE /v1/adapters (docs/adapters.md)")
    s.add_argument("--max-adapters", type=positive_int, default=8, metavar="N",
                   help="adapters loaded at once (default: 8)")
    s.add_argument("--embedder", default=None, metavar="MODEL",
                   help="model for /v1/embeddings, e.g. minilm-l6 (default: the generator's own hidden states)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LMFORGE_API_KEY if set)")
    s.add_argument("--max-concurrent", type=positive_int, default=16, metavar="N",
                   help="generations run together as one batch (default: 16)")
    s.add_argument("--max-queue", type=non_negative_int, default=64, metavar="N",
                   help="generations that may wait beyond those; more get 429 (default: 64)")
    s.add_argument("--prefix-cache-mb", type=non_negative_int, default=256, metavar="MB",
                   help="memory for keys/values of earlier prompts, reused by a chat's next turn (0: off; "
                        "default: 256)")
    s.add_argument("--batch-invariant", choices=["on", "off"], default="on",
                   help="on: a request's tokens and logprobs are the same whatever else the server is running "
                        "(decode rows on one kernel path, per-row attention, prefix reuse on the prefill chunk grid "
                        "only); off: the fastest kernels for each batch size, whose last bits depend on it "
                        "(default: on; its cost: docs/serving.md)")
    s.add_argument("--prefill-chunk", type=non_negative_int, default=128, metavar="N",
                   help="prompt tokens prefilled per step (all waiting prompts together) between the running rows' "
                        "decode steps, so a long prompt delays them by one chunk's time per token (0: whole prompts "
                        "at once; default: 128)")
    s.add_argument("--prefix-grain", type=non_negative_int, default=16, metavar="N",
                   help="with batch invariance, a prompt shorter than one chunk prefills in pieces of N tokens, so "
                        "short prompts reuse each other's cached prefixes in steps of N (e.g. a shared system "
                        "prompt); must divide --prefill-chunk (0: one piece; default: 16)")
    s.add_argument("--speculative", choices=["auto", "off", "prompt-lookup"], default="auto",
                   help="prompt-lookup speculative decoding of a greedy request alone in the batch (drafts from "
                        "the prompt and output, verified in one forward; the same tokens and logprobs as without); "
                        "what a request's speculative 'auto' means: auto = prompt-lookup on float weights, off on "
                        "int4/int8 weights (where it did not measure faster; docs/serving.md). A request may "
                        "still ask for prompt-lookup or off by name (default: auto)")
    s.add_argument("--max-tokens", type=positive_int, default=1024, metavar="N",
                   help="largest max_tokens a request may ask for (default: 1024)")
    s.add_argument("--max-prompt-tokens", type=positive_int, default=None, metavar="N",
                   help="longest prompt in tokens (default: the model's context length)")
    s.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, metavar="N",
                   help="largest request body (default: 1 MiB)")
    s.add_argument("--compile-decode", choices=SERVER_COMPILE, default="auto",
                   help="the decode step of a batch of one row (a single client): trace = the static step traced "
                        "with torch.jit.trace (a fraction of a second once per cache length, then faster steps: "
                        f"see docs/benchmarks.md); auto = trace a cache length once it has {AUTO_TRACE_STEPS} steps "
                        "to run; off = eager. Batches of several rows run eagerly (their shape changes as rows join "
                        "and leave). There is no 'on': the server's step has no torch.compile path")
    s.add_argument("--quantize", choices=["auto", "none", "8", "4"], default="auto",
                   help="auto: a quantized GGUF decodes on its int4/int8 path; none: float32; 8|4: from floats")
    s.add_argument("--device", default="auto", help=DEVICE_HELP + "; every model of the server loads there (on "
                   "a GPU: bfloat16 weights, quantized GGUF files dequantized)")
    s.add_argument("--allowed-hosts", default="", metavar="HOST[,HOST...]",
                   help="more names the Host header may carry besides 127.0.0.1, localhost, ::1 and --host "
                        "(DNS rebinding protection); '*' allows any, '.example.com' a domain and its subdomains")
    s.add_argument("--cors-origin", default=None, metavar="ORIGIN",
                   help="send CORS headers to this one web origin (e.g. https://app.example, or *); default: none")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)


def build_app(a: argparse.Namespace):
    """Load the models named by the flags and return the app (no server started): what tests call."""
    try:
        from lmforge.serve.app import create_app
        from lmforge.serve.settings import Embedder, ServeSettings, server_compile
    except ImportError as e:
        raise LmforgeError(f"serve needs fastapi and uvicorn ({e.name} is missing): "
                           "pip install fastapi uvicorn") from None

    api_key = a.api_key if a.api_key is not None else os.environ.get("LMFORGE_API_KEY") or None
    allowed = [h.strip() for h in (a.allowed_hosts or "").split(",") if h.strip()]
    settings = ServeSettings(api_key=api_key, host=a.host, allowed_hosts=allowed, cors_origin=a.cors_origin,
                             max_concurrent=a.max_concurrent,
                             max_queue=a.max_queue, max_tokens=a.max_tokens, max_prompt_tokens=a.max_prompt_tokens,
                             max_body_bytes=a.max_body_bytes, prefix_cache_mb=a.prefix_cache_mb,
                             batch_invariant=getattr(a, "batch_invariant", "on") == "on",
                             prefill_chunk=getattr(a, "prefill_chunk", 128),
                             prefix_grain=getattr(a, "prefix_grain", 16),
                             speculative=getattr(a, "speculative", "auto"),
                             default_max_tokens=min(256, a.max_tokens))
    settings.max_adapters = getattr(a, "max_adapters", 8)
    settings.validate()
    adapters = []
    for spec in getattr(a, "adapter", None) or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LmforgeError(f"--adapter {spec!r}: give NAME=RUN_DIR (e.g. sentiment=runs/sentiment)")
        if any(name == n for n, _ in adapters):
            raise LmforgeError(f"--adapter {spec!r}: the name {name!r} is given twice")
        adapters.append((name, path))
    compile_mode = server_compile(getattr(a, "compile_decode", "auto"))  # "on" is a ConfigError, before any load
    device = getattr(a, "device", "auto")
    gen = load_generator(a.model, a.quantize, device=device)
    device = str(next(gen.model.parameters()).device)  # "auto" resolved: the other models join the generator
    gen.compile = compile_mode
    if a.max_prompt_tokens is not None and a.max_prompt_tokens >= gen.model.cfg.context_length:
        logging.getLogger("lmforge.serve").warning(
            "--max-prompt-tokens %d is not below the context length %d: prompts are bounded by the context",
            a.max_prompt_tokens, gen.model.cfg.context_length)
    classifier = None
    if a.classifier:
        from lmforge.tasks.classify import load_classifier

        classifier = load_classifier(a.classifier, device=device)
        settings.classifier_name = os.path.basename(os.path.normpath(a.classifier))
    embedder = None
    if a.embedder:
        embedder = Embedder.load(a.embedder, device=device)
    app = create_app(gen, embedder=embedder, classifier=classifier, settings=settings)
    for name, path in adapters:  # a bad one stops the start with one line naming it
        app.state.lmforge.load_adapter(name, path)
    return app


def cmd_serve(a: argparse.Namespace) -> int:
    if not 0 <= a.port <= 65535:
        raise LmforgeError(f"--port {a.port}: must be in 0..65535")
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lmforge").setLevel(getattr(logging, a.log_level.upper()))
    log = logging.getLogger("lmforge.serve")
    app = build_app(a)
    import uvicorn

    st = app.state.lmforge
    if not is_loopback(a.host) and not st.settings.api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(pass --api-key or set LMFORGE_API_KEY)", a.host)
    log.info("serving %s on http://%s:%d (chat page at /, API at /v1)", st.model_id, a.host, a.port)
    from lmforge.serve.middleware import header_timeout_protocol

    # keep-alive: an idle connection closes after 5 s; a request's headers must arrive within HEADER_TIMEOUT_S
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False, timeout_keep_alive=5,
                http=header_timeout_protocol())
    return 0
