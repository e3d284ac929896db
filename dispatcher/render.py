"""Renders template content with a delivery's variables in a hardened, bounded Jinja2 sandbox.

Placeholders are {{ name }} (filters and conditionals work too); a variable the content needs but the
intent lacks is an error, not an empty string. HTML bodies are autoescaped; subjects and texts are not.

A template is tenant input, so rendering is bounded (docs/security.md, "Templates and the shared worker"):
- `**`, `*`, `+` and `%` are intercepted: no number over RENDER_MAX_INT_BITS bits, no string or list longer than the
  output cap, no `%` format with a huge or `*` width;
- `range` stops at 10,000 items; filters take no integer argument over the output cap, and are never evaluated at
  compile time (so saving `{{ 'x'|center(10**9) }}` cannot exhaust the API either);
- output is counted while it is generated and stops at the cap of its field (subject, text, HTML);
- the worker (and the API's dry run) render in child processes (dispatcher/render_pool.py) with an address-space limit
  and a time budget per delivery, so a template that still manages to be slow or large fails alone and never blocks an
  event loop.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, pass_context
from jinja2.runtime import Context, new_context
from jinja2.sandbox import SandboxedEnvironment, SecurityError
from jinja2.utils import _PassArg

from dispatcher.settings import DECLARED, Settings

# Characters Python's str.splitlines() breaks on; the e-mail package refuses a header containing any of them.
LINE_BREAKS = re.compile("[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
MAX_RANGE = 10_000
_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds of one render (settings DISPATCHER_RENDER_*; docs/operations.md)."""

    max_chars: int = DECLARED["render_max_chars"].default  # a text body (e-mail text, SMS, WhatsApp text)
    max_html_chars: int = DECLARED["render_max_html_chars"].default  # an e-mail HTML body
    max_subject_chars: int = DECLARED["render_max_subject_chars"].default  # an e-mail subject
    max_int_bits: int = 4096  # the largest number `*` or `**` may produce

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_chars=settings.render_max_chars,
            max_html_chars=settings.render_max_html_chars,
            max_subject_chars=settings.render_max_subject_chars,
        )


class RenderError(Exception):
    """The content cannot be rendered (template gone, variable missing, syntax, a bound hit): the delivery fails."""


class OutputTooLarge(RenderError):
    """The rendered field passed its size cap."""


def _check_percent(fmt: str, limit: int) -> None:
    for m in _PERCENT.finditer(fmt):
        for width in m.groups():
            if width == "*" or (width and int(width) > limit):
                raise SecurityError("%-format width or precision too large")


def _check_args(args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            raise SecurityError(
                f"argument {value if abs(value) < 10**12 else 'of ' + str(value.bit_length()) + ' bits'} is too large"
            )


class BoundedEnvironment(SandboxedEnvironment):
    """The sandbox with arithmetic, range, filter arguments and constant folding bounded."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self, limits: Limits, **options: Any) -> None:
        super().__init__(undefined=StrictUndefined, keep_trailing_newline=True, **options)
        self.limits = limits
        big = max(limits.max_chars, limits.max_html_chars)
        self._big = big
        self.globals.pop("lipsum", None)
        self.globals["range"] = self._range
        self.filters = {name: self._guard(name, f) for name, f in self.filters.items()}

    def _range(self, *args: int) -> range:
        rng = range(*args)
        if len(rng) > MAX_RANGE:
            raise SecurityError(f"range of more than {MAX_RANGE} items")
        return rng

    def _guard(self, name: str, f: Any) -> Any:
        kind, big = _PassArg.from_obj(f), self._big

        # pass_context: Jinja never calls such a filter at compile time (no constant folding of hostile literals).
        @pass_context
        def guarded(ctx: Context, value: Any = None, *args: Any, **kwargs: Any) -> Any:
            if name == "format" and isinstance(value, str):
                _check_percent(value, big)
            else:
                _check_args(args, kwargs, big)
            if kind is _PassArg.context:
                return f(ctx, value, *args, **kwargs)
            if kind is _PassArg.eval_context:
                return f(ctx.eval_ctx, value, *args, **kwargs)
            if kind is _PassArg.environment:
                return f(ctx.environment, value, *args, **kwargs)
            return f(value, *args, **kwargs)

        return guarded

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        bits, big = self.limits.max_int_bits, self._big
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**":
            if ints and right > 0 and max(1, abs(left).bit_length()) * right > bits and abs(left) > 1:
                raise SecurityError("power too large")
            return left**right
        if operator == "*":
            if ints and abs(left).bit_length() + abs(right).bit_length() > bits:
                raise SecurityError("product too large")
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > big:
                    raise SecurityError("repeated sequence too long")
            return left * right
        if operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) and len(left) + len(right) > big:
                raise SecurityError("concatenation too long")
            return left + right
        if operator == "%":
            if isinstance(left, str):
                _check_percent(left, big)
            return left % right
        return super().call_binop(context, operator, left, right)


@functools.lru_cache(maxsize=8)
def environments(limits: Limits) -> tuple[BoundedEnvironment, BoundedEnvironment]:
    return BoundedEnvironment(limits, autoescape=False), BoundedEnvironment(limits, autoescape=True)


@functools.lru_cache(maxsize=1024)
def _compiled(source: str, escape: bool, limits: Limits) -> tuple[Template, dict[str, Any]]:
    """Compiling is ~100x the cost of rendering; a batch renders the same few templates many times. With the template,
    its globals copied once into a plain dict: Template.generate copies them (a ChainMap, slow to iterate) on every
    render, which cost more than rendering a short message (docs/benchmarks.md, "Dispatch: where the time goes")."""
    template = environments(limits)[escape].from_string(source)
    return template, dict(template.globals)


def _generate(template: Template, template_globals: dict[str, Any], variables: dict[str, Any]) -> Any:
    """Template.generate(variables), with the globals from _compiled's plain dict: the same context, the same errors."""
    context = new_context(template.environment, template.name, template.blocks, dict(variables), False, template_globals)
    try:
        yield from template.root_render_func(context)
    except Exception:  # noqa: BLE001 - re-raised by handle_exception, as Template.generate does
        yield template.environment.handle_exception()


@functools.lru_cache(maxsize=4096)
def _only_placeholders(source: str) -> bool:
    """Whether a template is literal text and bare `{{ name }}` lookups only. Its output is then its own text plus the
    variables' text (which the submission's body limit bounds), so it renders in linear time with nothing a tenant
    can make slow or large: no loops, calls, filters, operators, attributes or tests."""
    from jinja2 import nodes

    try:
        tree = environments(Limits())[0].parse(source)
    except Exception:  # noqa: BLE001 - unparsable: the isolated path reports it
        return False
    for node in tree.body:
        if not isinstance(node, nodes.Output):
            return False
        for child in node.nodes:
            if not (isinstance(child, nodes.TemplateData) or (isinstance(child, nodes.Name) and child.ctx == "load")):
                return False
    return True


def needs_isolation(channel: str, content: dict[str, Any] | None) -> bool:
    """False for content that renders in bounded time and memory in the worker itself: WhatsApp template parameters
    (no template engine at all) and texts of bare placeholders. Everything else renders in a child process."""
    if content is None:
        return False  # fails at once: "template content not found"
    if channel == "whatsapp" and "name" in content:
        return False
    fields = ("subject", "text", "html") if channel == "email" else ("text",)
    return not all(_only_placeholders(content[f]) for f in fields if isinstance(content.get(f), str))


def check_syntax(source: str, *, escape: bool = False, limits: Limits = Limits()) -> str | None:
    """The reason a template cannot be compiled, or None. Used when a template is saved (no caching)."""
    try:
        environments(limits)[escape].compile(source)
    except TemplateError as exc:
        return exc.message or type(exc).__name__
    except Exception as exc:  # e.g. RecursionError on absurd nesting, ValueError on a 5,000-digit literal
        return type(exc).__name__
    return None


def fill(
    template: str, variables: dict[str, Any], *, escape: bool = False, limit: int | None = None, limits: Limits = Limits()
) -> str:
    """Renders chunk by chunk, stopping as soon as the output passes `limit` characters."""
    cap = limits.max_chars if limit is None else limit
    try:
        out, size = [], 0
        for chunk in _generate(*_compiled(template, escape, limits), variables):
            size += len(chunk)
            if size > cap:
                raise OutputTooLarge(f"OutputTooLarge: rendered output over {cap} characters")
            out.append(chunk)
        return "".join(out)
    except TemplateError as exc:
        raise RenderError(f"{type(exc).__name__}: {exc.message or 'template error'}") from None


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def render(channel: str, content: dict[str, Any] | None, variables: dict[str, Any], limits: Limits = Limits()) -> dict[str, Any]:
    if content is None:
        raise RenderError("template content not found")
    if channel == "email":
        subject = fill(content["subject"], variables, limit=limits.max_subject_chars, limits=limits)
        out = {"subject": LINE_BREAKS.sub(" ", subject), "text": fill(content["text"], variables, limits=limits)}
        if content.get("html"):
            out["html"] = fill(content["html"], variables, escape=True, limit=limits.max_html_chars, limits=limits)
        return out
    if channel == "whatsapp" and "name" in content:
        params, header = content.get("parameters") or [], content.get("header_parameters") or []
        buttons = content.get("buttons") or []
        missing = [p for p in [*params, *header, *(b["parameter"] for b in buttons)] if p not in variables]
        if missing:
            raise RenderError(f"variable {missing[0]} missing")
        out: dict[str, Any] = {
            "template": content["name"],
            "language": content.get("language") or "en",
            "parameters": [_text(variables[p]) for p in params],
        }
        if header:
            out["header_parameters"] = [_text(variables[p]) for p in header]
        if buttons:
            out["buttons"] = [
                {"sub_type": b["sub_type"], "index": int(b["index"]), "value": _text(variables[b["parameter"]])} for b in buttons
            ]
        return out
    return {"text": fill(content["text"], variables, limits=limits)}
