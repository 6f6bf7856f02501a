"""Constrained decoding as a logits mask: a JSON schema, a regular expression, a context-free grammar (Lark or
GBNF) or a fixed list of choices, compiled once per tokenizer, then one `Matcher` per generated row that says
which tokens may come next and is advanced with the token that was chosen.

Why llguidance (not xgrammar, not a hand-written automaton): it takes every format above natively (GBNF included),
builds its token trie straight from our `tokenizers` JSON, needs no torch (xgrammar pins torch, transformers and
triton), compiles a schema in about a millisecond (nothing to precompute per vocabulary entry) and computes a mask
in tens of microseconds on a 49k vocabulary; docs/benchmarks.md (structured.py --libraries) has both measured.

Usage (the decode loop, the server's RowSampler and the tool-call code all do this):

    compiler = ConstraintCompiler(tokenizer)                  # one per tokenizer: owns the library's vocabulary
    c = compiler.compile("json_schema", {"type": "object"})   # cached by (kind, spec); ConstraintError if invalid
    m = c.matcher(stop_ids=[eos])                             # one per row
    logits = m.apply(logits)                                  # (1, V) or (V,): disallowed tokens -> -inf
    m.advance(token)                                          # the token that was sampled (a stop id ends it)
    m.accepting, m.finished                                   # a complete structure / nothing but a stop id left

`compile_constraint(tokenizer, kind, spec)` is the one-call form (it builds a compiler: pass `compiler=` to reuse
one). The mask is computed on the CPU from the matcher's state; with `ConstraintCompiler(prefetch=True)`,
`Matcher.prefetch()` starts the next one on a worker thread (the library releases the GIL), so it runs while the
model computes the next logits (off by default: see ConstraintCompiler).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmforge.errors import GenerationError

KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "grammar", "lark", "gbnf", "choices")
# Compact separators: what a model writes unprompted ({"a": 1, "b": [2, 3]}), and no runs of free whitespace that
# a small model can fill until max_tokens.
JSON_OPTIONS: tuple[tuple[str, Any], ...] = (("whitespace_flexible", False), ("item_separator", ", "),
                                             ("key_separator", ": "))


class ConstraintError(GenerationError):
    """A schema, regex, grammar or choice list the constraint library cannot compile (the server's 400)."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a dependency of lmforge; an install without it still runs everything else
        raise ConstraintError("constrained decoding needs llguidance: pip install llguidance") from e
    return llguidance


def _one_line(msg: str) -> str:
    """The library's multi-line message in one line, without its caret and source-echo lines."""
    lines = [s.strip() for s in str(msg).splitlines()]
    lines = [s for s in lines if s and s.strip("^ ") and not re.match(r"^\d*\s*\|", s)]
    return " ".join(lines)[:400]


def spec_key(kind: str, spec: Any) -> str:
    """The cache key of a spec: canonical JSON, so equal schemas written differently share one entry."""
    return kind + ":" + json.dumps(spec, sort_keys=True, separators=(",", ":"))


def grammar_text(kind: str, spec: Any) -> str:
    """(kind, spec) -> the llguidance grammar definition; ConstraintError naming the construct on a bad spec."""
    llg = _llguidance()
    if kind not in KINDS:
        raise ConstraintError(f"constraint kind {kind!r} is not one of {', '.join(KINDS)}")
    try:
        if kind in ("json_schema", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else spec
            if isinstance(schema, str):
                schema = json.loads(schema)
            if isinstance(schema, bool):
                schema = {} if schema else {"not": {}}
            if not isinstance(schema, dict):
                raise ConstraintError(f"json_schema: expected a JSON object, got {type(schema).__name__}")
            schema = {**schema, "x-guidance": {**dict(JSON_OPTIONS), **schema.get("x-guidance", {})}}
            return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        if kind == "choices":
            if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec \
                    or not all(isinstance(c, str) and c for c in spec):
                raise ConstraintError("choices: expected a non-empty list of non-empty strings")
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))
        if not isinstance(spec, str) or not spec.strip():
            raise ConstraintError(f"{kind}: expected a non-empty string")
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec)
        fmt = {"grammar": "grammar", "lark": "lark", "gbnf": "gbnf"}[kind]
        return llg.grammar_from(fmt, spec)
    except ConstraintError:
        raise
    except json.JSONDecodeError as e:
        raise ConstraintError(f"json_schema: not valid JSON ({e})") from e
    except Exception as e:  # the library's ValueError / RuntimeError with its own message
        raise ConstraintError(f"{kind}: {_one_line(e)}") from e


@dataclass
class Constraint:
    """A compiled spec for one tokenizer: `matcher()` gives each row its own state (a cheap copy)."""

    kind: str
    spec: Any
    _template: Any = field(repr=False)  # an llguidance.LLMatcher in its start state
    _vocab_size: int = field(repr=False)
    _library_eos: tuple[int, ...] = field(repr=False)
    _executor: ThreadPoolExecutor | None = field(default=None, repr=False)

    def matcher(self, stop_ids: Sequence[int] = ()) -> Matcher:
        """A fresh per-row matcher. stop_ids: the row's stop tokens, allowed once the structure is complete."""
        return Matcher(self._template.deep_copy(), self._vocab_size, tuple(stop_ids), self._library_eos,
                       self._executor)


class Matcher:
    """One row's place in a constraint: the allowed-token mask for the next step, advanced token by token."""

    def __init__(self, m, vocab_size: int, stop_ids: tuple[int, ...], library_eos: tuple[int, ...],
                 executor: ThreadPoolExecutor | None) -> None:
        self._m, self.vocab_size, self.stop_ids = m, vocab_size, stop_ids
        self._library_eos = np.array([t for t in library_eos if t < vocab_size], dtype=np.int64)
        self._stops = np.array([t for t in stop_ids if t < vocab_size], dtype=np.int64)
        self._executor = executor
        self._pending: Future | None = None
        self._blocked: tuple[torch.Tensor, bool] | None = None  # (V,) bool, any token allowed: for this state
        self.ended = False  # a stop id was consumed

    def _settle(self) -> None:
        """Wait for a prefetch in flight: the library's matcher is not to be read while it computes."""
        if self._pending is not None:
            self._blocked, self._pending = self._pending.result(), None

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (a stop id may come now)."""
        self._settle()
        return self.ended or bool(self._m.is_accepting())

    @property
    def finished(self) -> bool:
        """Nothing but a stop id can follow (or one already did)."""
        self._settle()
        return self.ended or bool(self._m.is_stopped())

    @property
    def error(self) -> str:
        self._settle()
        return self._m.get_error() if self._m.is_error() else ""

    def _compute(self) -> tuple[torch.Tensor, bool]:
        """((V,) bool of the blocked tokens, whether any token is allowed) from the library's bitmask (one bit per
        token, little-endian): unpacked in numpy, inverted before unpacking, so it is one pass over V bytes."""
        words = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        blocked = np.unpackbits(~words, bitorder="little")  # (32 W,) uint8, 1 = not allowed
        V = self.vocab_size
        if blocked.shape[0] < V:
            blocked = np.concatenate([blocked, np.ones(V - blocked.shape[0], dtype=np.uint8)])
        blocked = blocked[:V]
        blocked[self._library_eos] = 1  # the library's own idea of EOS; the row's stop ids replace it
        if self._stops.size and (self._m.is_accepting() or self._m.is_stopped()):
            blocked[self._stops] = 0
        return torch.from_numpy(blocked.view(np.bool_)), not bool(blocked.all())

    def _state(self) -> tuple[torch.Tensor, bool]:
        self._settle()
        if self._blocked is None:
            self._blocked = self._compute()
        return self._blocked

    def prefetch(self) -> None:
        """Start computing the next mask on the constraint's worker thread (overlaps the model's step)."""
        if self._executor is not None and self._pending is None and self._blocked is None and not self.ended:
            self._pending = self._executor.submit(self._compute)

    def mask(self) -> torch.Tensor:
        """(V,) bool: the tokens allowed next (a prefetched mask if one was started)."""
        return ~self._state()[0]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V) -> a copy with every disallowed token at -inf (a finished row keeps its logits)."""
        if self.ended:
            return logits
        blocked, any_allowed = self._state()
        if not any_allowed:
            raise GenerationError(f"constraint: no token may follow ({self.error or 'no stop token id to end on'})")
        V = logits.shape[-1]
        if V != blocked.shape[0]:  # the model's head may be wider than the tokenizer (padded vocabularies)
            blocked = torch.cat([blocked, blocked.new_ones(max(0, V - blocked.shape[0]))])[:V]
        return logits.masked_fill(blocked.to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        """Consume the chosen token; GenerationError if the constraint did not allow it."""
        if self.ended:
            return
        self._settle()  # a mask for the state we are leaving: wait it out, drop it
        self._blocked = None
        if token in self.stop_ids:
            self.ended = True
            return
        if not self._m.consume_token(int(token)):
            raise GenerationError(f"constraint: token {token} is not allowed here ({_one_line(self._m.get_error())})")


class ConstraintCompiler:
    """Compiles specs for one tokenizer and caches them (LRU on `spec_key`); holds the library's vocabulary, which
    takes about a second to build. Thread-safe. prefetch: compute each next mask on a worker thread while the model
    steps; off by default because on a CPU whose cores torch's threads already use, the extra thread slowed the
    step more than the mask costs (benchmarks/structured.py, the decode-loop table)."""

    def __init__(self, tokenizer, vocab_size: int | None = None, max_cached: int = 256, prefetch: bool = False) -> None:
        llg = _llguidance()
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size or 0, tokenizer.vocab_size)
        backend = tokenizer.backend if hasattr(tokenizer, "backend") else tokenizer
        eos = list(getattr(tokenizer, "eos_ids", None) or [])
        if not eos and getattr(tokenizer, "eos_id", None) is not None:
            eos = [tokenizer.eos_id]
        special = getattr(tokenizer, "all_special_ids", None)
        if special is not None:  # an "eos" that is an ordinary piece (a config's stray id) stays a grammar token
            eos = [t for t in eos if t in set(special)]
        try:
            self._lltok = llg.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=eos or None)
        except Exception as e:
            raise ConstraintError(f"constraint: the tokenizer cannot be used by llguidance ({_one_line(e)})") from e
        self._eos = tuple(eos)
        self._cache: OrderedDict[str, Constraint] = OrderedDict()
        self._lock = threading.Lock()
        self.max_cached = max_cached
        self.hits = self.misses = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lmforge-mask") if prefetch else None

    def compile(self, kind: str, spec: Any = None) -> Constraint:
        """-> the Constraint for (kind, spec), from the cache when seen before; ConstraintError when invalid."""
        key = spec_key(kind, spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        grammar = grammar_text(kind, spec)
        llg = _llguidance()
        m = llg.LLMatcher(self._lltok, grammar)
        if m.is_error():
            raise ConstraintError(f"{kind}: {_one_line(m.get_error())}")
        c = Constraint(kind, spec, m, self.vocab_size, self._eos, self._executor)
        with self._lock:
            self.misses += 1
            self._cache[key] = c
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return c


def compile_constraint(tokenizer, kind: str, spec: Any = None, *, compiler: ConstraintCompiler | None = None
                       ) -> Constraint:
    """One call: compile (kind, spec) for `tokenizer` (through `compiler`, whose cache it uses, when given)."""
    if compiler is None:
        compiler = ConstraintCompiler(tokenizer)
    elif compiler.tokenizer is not tokenizer:
        raise GenerationError("compile_constraint: the compiler belongs to another tokenizer")
    return compiler.compile(kind, spec)


def constraint_options(*, json_schema: Any = None, regex: str | None = None, grammar: str | None = None,
                       choices: Sequence[str] | None = None) -> tuple[str, Any] | None:
    """The one (kind, spec) that the user options name (None when none does); GenerationError for several."""
    given = [(k, v) for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                 ("choices", choices)) if v is not None]
    if len(given) > 1:
        names = " and ".join(k for k, _ in given)
        raise GenerationError(f"give one of json_schema / regex / grammar / choices, not {names}")
    return given[0] if given else None


class BatchMasker:
    """The next-token masks of a batch's constrained rows, filled by one batched library call on a worker thread
    while the model computes the step's logits (a step's mask depends only on the tokens fed to it), then put on
    the logits in one select. Why one batched call and not a per-row loop on the thread: the library's call
    releases the GIL once for all rows, so the thread takes the interpreter twice a step instead of twice a row
    from the decode loop's Python. Not thread-safe: one decode loop drives it; between `start` and `apply` the
    caller must not touch the rows' matchers."""

    def __init__(self, threads: int = 1) -> None:
        """threads: the library's own threads for the fill (1: one core for the masks, the others run the model)."""
        self._lib = _llguidance().LLExecutor(threads)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="lmforge-masks")
        self._pending: Future | None = None
        self._rows: list[tuple[int, Matcher]] = []
        self._words = np.zeros((0, 0), dtype=np.int32)  # (rows, W): one bit per token, 1 = allowed

    def start(self, matchers: Sequence[Matcher | None], background: bool = True) -> bool:
        """Begin filling the masks of the rows whose matcher has not ended (None: a free row) -> whether any has.
        Row b of `matchers` is row b of the logits that `apply` gets. background False: fill them now, in this
        thread (one batched call still: a tenth of a per-row loop)."""
        self.wait()
        self._rows = [(b, m) for b, m in enumerate(matchers) if m is not None and not m.ended]
        if not self._rows:
            return False
        V = self._rows[0][1].vocab_size
        if any(m.vocab_size != V for _, m in self._rows):
            raise GenerationError("BatchMasker: the rows' constraints belong to tokenizers of different sizes")
        W = (V + 31) // 32
        if self._words.shape != (len(self._rows), W):
            self._words = np.zeros((len(self._rows), W), dtype=np.int32)
        for _, m in self._rows:
            m._settle()  # a row's own prefetch in flight (Matcher.prefetch) must not run beside the batched fill
        pairs = [(m._m, i) for i, (_, m) in enumerate(self._rows)]
        args = (pairs, self._words.ctypes.data, W * 4, len(pairs))
        if background:
            self._pending = self._thread.submit(self._lib.unsafe_compute_mask_ptr, *args)
        else:
            self._lib.unsafe_compute_mask_ptr(*args)
        return True

    def wait(self) -> None:
        """Wait for a fill in flight (errors surface in `apply`; here only the buffer's use is waited out)."""
        if self._pending is not None:
            try:
                self._pending.result()
            except Exception:  # noqa: BLE001 - reported by apply, which reads the same future
                pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) of the rows given to `start` -> them with -inf on each constrained row's blocked tokens
        (in place where a subset of rows is constrained; free rows unchanged). GenerationError when a row has no
        allowed token."""
        if not self._rows:
            return logits
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        rows, V = self._rows, logits.shape[-1]
        # one bit per token, little-endian: invert, then unpack -> 1 = blocked
        blocked = np.unpackbits((~self._words).view(np.uint8), axis=1, bitorder="little")  # (R, 32 W) uint8
        if blocked.shape[1] < V:  # the model's head may be wider than the tokenizer (padded vocabularies)
            blocked = np.concatenate([blocked, np.ones((len(rows), V - blocked.shape[1]), np.uint8)], axis=1)
        blocked = blocked[:, :V]
        for i, (_, m) in enumerate(rows):  # the library's idea of EOS out; the row's stop ids in once complete
            blocked[i, m._library_eos] = 1
            if m._stops.size and (m._m.is_accepting() or m._m.is_stopped()):
                blocked[i, m._stops] = 0
        stuck = np.flatnonzero(blocked.all(axis=1))
        if stuck.size:
            m = rows[int(stuck[0])][1]
            raise GenerationError(f"constraint: no token may follow ({m.error or 'no stop token id to end on'})")
        mask = torch.from_numpy(blocked.view(np.bool_)).to(logits.device)  # (R, V)
        ninf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
        if len(rows) == logits.shape[0]:
            return torch.where(mask, ninf, logits)  # a select, not masked_fill: no branch per element
        idx = torch.tensor([b for b, _ in rows], dtype=torch.long, device=logits.device)
        logits[idx] = torch.where(mask, ninf, logits[idx])
        return logits


def apply_matchers(logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> torch.Tensor:
    """logits (B, V), one matcher (or None: free) per row -> the masked logits (rows without one unchanged)."""
    if not any(m is not None and not m.ended for m in matchers):
        return logits
    rows = [m.apply(logits[b]) if m is not None else logits[b] for b, m in enumerate(matchers)]
    return torch.stack(rows)  # (B, V)
