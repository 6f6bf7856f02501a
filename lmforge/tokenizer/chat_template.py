"""Chat templates (jinja2, as transformers renders them) in a sandbox: templates come from model files."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from lmforge.errors import TokenizerError
from lmforge.tokenizer.backends import one_line


def render_chat_template(source: str, context: dict[str, Any], what: str) -> str:
    """Render `source` with `context`; any failure (the template is data) -> TokenizerError naming `what`."""
    try:
        return _compile_template(source).render(**context)
    except Exception as e:  # the template is data from a model file: whatever it raises is its fault
        raise TokenizerError(f"{what} failed to render: {_template_cause(e)}") from None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False):
    """Jinja's own tojson escapes HTML characters; chat templates expect plain JSON."""
    from markupsafe import Markup

    return Markup(json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                             sort_keys=sort_keys))


def _template_cause(e: Exception) -> str:
    """One line: the template's own message (raise_exception, syntax, sandbox) or the Python error it hit."""
    import jinja2

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


_MAX_TEMPLATE_ITEMS = 1_000_000  # longest string / list a template may build with `*`
_MAX_POWER_BITS = 4096  # largest integer a template may build with `**`


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    """Chat templates come from model files, so they run in jinja2's immutable sandbox, which also refuses
    the two cheap memory bombs it lets through (`'x' * 10**9`, `9 ** 10**9`); ranges it caps itself."""
    import jinja2.ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator: str, left, right):
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_TEMPLATE_ITEMS:
                    raise SecurityError(f"a repeated sequence longer than {_MAX_TEMPLATE_ITEMS:,} items is refused")
            elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * abs(left).bit_length() > _MAX_POWER_BITS:
                raise SecurityError(f"a power above 2**{_MAX_POWER_BITS} is refused")
            return super().call_binop(context, operator, left, right)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for loss masks; render as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)

