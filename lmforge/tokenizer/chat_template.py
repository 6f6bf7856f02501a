"""Chat templates (jinja2, as transformers renders them) in a sandbox with limits: templates come from model files.

A template is untrusted code, so it runs in jinja2's immutable sandbox (no attribute escapes, no mutation of the
caller's data) and under two limits checked while it runs, so that no template can exhaust CPU or memory:
- time: a deadline checked at every loop iteration, block, call, filter and operator (`time_limit`);
- size: every string or container it builds, and all the text it writes (the output and the buffers of macros
  and set blocks together), must stay under `max_chars`; operations that can grow text by a large factor in one
  step (repetition, padding widths, replace, join, format) are checked before they run.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lmforge.errors import TokenizerError
from lmforge.tokenizer.backends import one_line

TIME_LIMIT_S = 2.0  # default time limit of one render; real templates take milliseconds
MIN_OUTPUT_CHARS = 4_000_000  # default output limit: this, or OUTPUT_FACTOR x the size of the inputs if larger
OUTPUT_FACTOR = 8
_MAX_TEMPLATE_ITEMS = 1_000_000  # longest string / list a template may build with `*`
_MAX_POWER_BITS = 4096  # largest integer a template may build with `**`
# filters that turn their whole input into text (a nested structure's text can be far larger than its references)
_SERIALIZING = frozenset({"string", "tojson", "pprint", "join", "format", "e", "escape", "forceescape", "urlencode",
                          "xmlattr", "indent", "center", "wordwrap", "replace", "trim", "upper", "lower", "title",
                          "capitalize", "striptags", "truncate", "urlize", "wordcount", "safe"})
_WIDTH = re.compile(r"\d+")


def render_chat_template(source: str, context: dict[str, Any], what: str, *, time_limit: float = TIME_LIMIT_S,
                         max_chars: int | None = None) -> str:
    """Render `source` with `context` -> text; any failure (the template is data) -> one-line TokenizerError naming
    `what`. Limits: `time_limit` seconds and `max_chars` characters (default: the larger of MIN_OUTPUT_CHARS and
    OUTPUT_FACTOR x the size of `context`), see the module docstring."""
    if max_chars is None:
        max_chars = max(MIN_OUTPUT_CHARS, OUTPUT_FACTOR * approx_size(context, 1 << 40))
    budget = _Budget(time.monotonic() + time_limit, time_limit, max_chars)
    token = _BUDGET.set(budget)
    try:
        parts = []
        for piece in _compile_template(source).generate(**context):  # streamed: counted as it is written
            budget.write(len(piece))
            parts.append(piece)
        return "".join(parts)
    except Exception as e:  # the template is data from a model file: whatever it raises is its fault
        raise TokenizerError(f"{what} failed to render: {_template_cause(e)}") from None
    finally:
        _BUDGET.reset(token)


@functools.lru_cache(maxsize=16)
def template_variables(source: str) -> frozenset[str]:
    """The names a template reads from its context (e.g. whether it renders `tools`); empty if it does not parse."""
    from jinja2 import meta

    try:
        env = _compile_template(source).environment
        return frozenset(meta.find_undeclared_variables(env.parse(source)))
    except Exception:  # the template is data from a model file: rendering it will report the problem
        return frozenset()


class LimitExceeded(Exception):
    """A render went over its time or size limit (the message names the limit)."""


@dataclass
class _Budget:
    deadline: float  # time.monotonic() value
    time_limit: float
    max_chars: int
    written: int = 0  # characters of output and buffers so far

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"stopped at the time limit of {self.time_limit:g} s")

    def write(self, n: int) -> None:
        self.written += n
        if self.written > self.max_chars:
            raise LimitExceeded(f"the text it writes is over the output limit of {self.max_chars:,} characters")
        self.tick()

    def check(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise LimitExceeded(f"{what} of about {size:,} characters is over the output limit of "
                                f"{self.max_chars:,} characters")

    def size(self, value: Any) -> int:
        """approx_size(value), walked under this budget's deadline."""
        return len(value) if isinstance(value, str) else approx_size(value, self.max_chars, self.tick)

    def check_ints(self, values, what: str) -> None:
        """Integer arguments beyond the output limit (a padding width, a count) would build text beyond it."""
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > self.max_chars:
                raise LimitExceeded(f"{what}: the argument {v:,} is over the output limit of {self.max_chars:,}")

    def check_result(self, value: Any, what: str) -> Any:
        if isinstance(value, str):
            self.check(len(value), what)
        elif isinstance(value, (list, tuple)) and len(value) > _MAX_TEMPLATE_ITEMS:
            raise LimitExceeded(f"{what}: a list of {len(value):,} items is over the limit of "
                                f"{_MAX_TEMPLATE_ITEMS:,}")
        return value


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("lmforge_chat_template_budget",
                                                                         default=None)


def _budget() -> _Budget:
    """The running render's budget; outside a render (jinja2 folding constants at compile time) a fresh default."""
    b = _BUDGET.get()
    return b if b is not None else _Budget(time.monotonic() + TIME_LIMIT_S, TIME_LIMIT_S, MIN_OUTPUT_CHARS)


def approx_size(obj: Any, cap: int, tick=None) -> int:
    """About how many characters `str(obj)` has (shared references counted each time, as str() does); the walk
    stops once past `cap`, so its cost is bounded whatever the structure; `tick()` runs every 4096 nodes."""
    from jinja2.utils import Namespace

    total, stack, seen = 0, [obj], 0
    while stack and total <= cap:
        x = stack.pop()
        seen += 1
        if tick is not None and not seen & 4095:
            tick()
        if isinstance(x, str):
            total += len(x) + 2
        elif isinstance(x, dict):
            total += 2 + 4 * len(x)
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(x)
            stack.extend(x)
        elif isinstance(x, Namespace):
            total += 12
            stack.append(getattr(x, "_Namespace__attrs", {}))
        elif isinstance(x, int) and not isinstance(x, bool):
            total += x.bit_length() // 3 + 1
        else:
            total += 8
    return total


def _max_width(fmt: str) -> int:
    """The largest number in a format string (a width or precision of %-formatting or str.format)."""
    return max((int(m) for m in _WIDTH.findall(fmt) if len(m) < 12), default=0) if "%" in fmt or "{" in fmt else 0


def _grown_size(name: str, s: Any, args: tuple, kwargs: dict, size) -> int:
    """Upper bound of the text that string method / filter `name` builds from `s` and its arguments (0: no growth
    beyond what the generic checks cover); `size` measures a value (_Budget.size)."""
    if not isinstance(s, str):
        return size(s) if name in _SERIALIZING else 0
    if name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        hits = s.count(old) if old else len(s) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            hits = min(hits, args[2])
        return len(s) + hits * max(len(new) - len(old), 0)
    if name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        return len(s) + s.count("\t") * (size if isinstance(size, int) else 8)
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        return len(s) + (s.count("\n") + 1) * (len(width) if isinstance(width, str) else int(width))
    if name in ("format", "format_map"):
        return max(len(s), _max_width(s)) + size((args, kwargs))
    if name == "join" and args and isinstance(args[0], (str, list, tuple)):
        return size(args[0]) + len(s) * len(args[0])
    return len(s)


def _guard_filter(name: str, func):
    """`func` (a jinja2 filter) with the limits: pre-checks for what it may build, a post-check of what it built."""
    skip = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1  # (env/context,) value, args...

    @functools.wraps(func)  # keeps jinja_pass_arg
    def guarded(*args, **kwargs):
        b = _budget()
        b.tick()
        b.check_ints((*args[skip:], *kwargs.values()), f"the {name} filter")
        if len(args) >= skip:
            value = args[skip - 1]
            if name == "join" and isinstance(value, (list, tuple)):
                sep = args[skip] if len(args) > skip else kwargs.get("d", "")
                b.check(_grown_size("join", str(sep), (value,), {}, b.size), "the join filter's text")
            else:
                b.check(_grown_size(name, value, args[skip:], kwargs, b.size), f"the {name} filter's text")
        return b.check_result(func(*args, **kwargs), f"the {name} filter")

    return guarded


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False):
    """Jinja's own tojson escapes HTML characters; chat templates expect plain JSON. A plain str, as transformers'
    filter returns: a Markup would HTML-escape whatever string is added to it (`'"' + key + '": ' + v|tojson`)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_cause(e: Exception) -> str:
    """One line: the template's own message (raise_exception, syntax, sandbox, limit) or the Python error it hit."""
    import jinja2

    if isinstance(e, LimitExceeded):
        return one_line(e)
    line = getattr(e, "lineno", None)
    where = f" (line {line})" if isinstance(e, jinja2.TemplateSyntaxError) and line else ""
    if isinstance(e, jinja2.exceptions.SecurityError):
        return f"refused by the sandbox: {one_line(e)}{where}"
    if isinstance(e, jinja2.exceptions.TemplateError):
        return f"{one_line(e)}{where}"
    return f"{type(e).__name__}: {one_line(e)[:200]}"


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


class _Buffer(list):
    """The output buffer of a macro, call or set block: counted against the output limit as it is written."""

    __slots__ = ()

    def append(self, s: str) -> None:
        _budget().write(len(s))
        super().append(s)

    def extend(self, items) -> None:
        items = tuple(items)
        _budget().write(sum(len(s) for s in items if isinstance(s, str)))
        super().extend(items)


def _code_generator():
    """jinja2's code generator with the limit hooks compiled in: a deadline check at the start of every block (each
    loop iteration runs one), counted buffers, and a size check on every `~`, list, tuple and dict it builds."""
    from jinja2.compiler import CodeGenerator

    class Guarded(CodeGenerator):
        def blockvisit(self, nodes, frame) -> None:
            self.writeline("environment.lmforge_tick()")
            super().blockvisit(nodes, frame)

        def buffer(self, frame) -> None:
            frame.buffer = self.temporary_identifier()
            self.writeline(f"{frame.buffer} = environment.lmforge_buffer()")

        def visit_Concat(self, node, frame) -> None:
            join = "markup_join" if frame.eval_ctx.volatile or frame.eval_ctx.autoescape else "str_join"
            self.write(f"environment.lmforge_concat({join}, (")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

        def _sized(self, visit, node, frame) -> None:
            self.write("environment.lmforge_sized(")
            visit(node, frame)
            self.write(")")

        def visit_List(self, node, frame) -> None:
            self._sized(super().visit_List, node, frame)

        def visit_Dict(self, node, frame) -> None:
            self._sized(super().visit_Dict, node, frame)

        def visit_Tuple(self, node, frame) -> None:
            if node.ctx == "load":  # a store target (`for a, b in ...`) must stay a target
                self._sized(super().visit_Tuple, node, frame)
            else:
                super().visit_Tuple(node, frame)

    return Guarded


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    """Chat templates come from model files, so they run in jinja2's immutable sandbox, with the limit hooks (see
    the module docstring); it also refuses the two cheap memory bombs it lets through (`'x' * 10**9`,
    `9 ** 10**9`); ranges it caps itself."""
    import jinja2.ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = _code_generator()

        def call_binop(self, context, operator: str, left, right):
            b = _budget()
            b.tick()
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * n > _MAX_TEMPLATE_ITEMS:
                        raise SecurityError(f"a repeated sequence longer than {_MAX_TEMPLATE_ITEMS:,} items is refused")
                    b.check(b.size(seq) * max(n, 0), "a repeated sequence")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                        and right * abs(left).bit_length() > _MAX_POWER_BITS:
                    raise SecurityError(f"a power above 2**{_MAX_POWER_BITS} is refused")
            elif operator == "%" and isinstance(left, str):
                b.check(max(len(left), _max_width(left)) + b.size(right), "a %-formatted string")
            return b.check_result(super().call_binop(context, operator, left, right), f"the result of {operator!r}")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 -- jinja2's signature
            b = _budget()
            b.tick()
            if __obj is not __self.globals.get("range"):  # the sandbox caps range() itself, with its own message
                b.check_ints((*args, *kwargs.values()), f"{getattr(__obj, '__name__', 'a call')}()")
            method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            owner = getattr(method, "__self__", None)
            if isinstance(owner, str):
                name = getattr(method, "__name__", "")
                b.check(_grown_size(name, owner, args, kwargs, b.size), f"str.{name}()'s text")
            out = super().call(__context, __obj, *args, **kwargs)
            if isinstance(out, (dict, jinja2.utils.Namespace)):  # dict(a=x, b=x), namespace(...): built from args
                b.check(b.size(out), "a built object")
            return b.check_result(out, f"{getattr(__obj, '__name__', 'a call')}()")

        def lmforge_tick(self) -> None:
            _budget().tick()

        def lmforge_buffer(self) -> _Buffer:
            return _Buffer()

        def lmforge_concat(self, join, parts: tuple) -> str:
            b = _budget()
            b.check(sum(len(p) if isinstance(p, str) else b.size(p) for p in parts),
                    "a '~' concatenation")
            return join(parts)

        def lmforge_sized(self, value):
            b = _budget()
            b.check(b.size(value), "a built list or dict")
            return value

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for loss masks; render as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def finalize(value):
        """What `{{ value }}` writes: a non-string's text may be far larger than the value (shared references)."""
        if not isinstance(value, str):
            b = _budget()
            b.check(b.size(value), "an output value")
        return value

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation],
                  finalize=finalize)
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)  # lipsum(n) builds n paragraphs in one call; no chat template uses it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
