"""Renders template content with a delivery's variables in a sandboxed Jinja2 environment.

Placeholders are {{ name }} (filters and conditionals work too); a variable the content needs but the
intent lacks is an error, not an empty string. HTML bodies are autoescaped; subjects and texts are not.
"""

from __future__ import annotations

import functools
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import SandboxedEnvironment

_plain = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
_html = SandboxedEnvironment(undefined=StrictUndefined, autoescape=True, keep_trailing_newline=True)


class RenderError(Exception):
    """The content cannot be rendered (template gone, variable missing, syntax): the delivery fails."""


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


@functools.lru_cache(maxsize=1024)
def _compiled(source: str, escape: bool) -> Template:
    """Compiling is ~100x the cost of rendering; a batch renders the same few templates many times."""
    return (_html if escape else _plain).from_string(source)


def fill(template: str, variables: dict[str, Any], *, escape: bool = False) -> str:
    try:
        return _compiled(template, escape).render(variables)
    except TemplateError as exc:
        raise RenderError(f"template error: {exc.message or type(exc).__name__}") from None


def render(channel: str, content: dict[str, Any] | None, variables: dict[str, Any]) -> dict[str, Any]:
    if content is None:
        raise RenderError("template content not found")
    if channel == "email":
        out = {"subject": fill(content["subject"], variables).replace("\r", " ").replace("\n", " "),
               "text": fill(content["text"], variables)}
        if content.get("html"):
            out["html"] = fill(content["html"], variables, escape=True)
        return out
    if channel == "whatsapp" and "name" in content:
        params, header = content.get("parameters") or [], content.get("header_parameters") or []
        buttons = content.get("buttons") or []
        missing = [p for p in [*params, *header, *(b["parameter"] for b in buttons)] if p not in variables]
        if missing:
            raise RenderError(f"variable {missing[0]} missing")
        out: dict[str, Any] = {"template": content["name"], "language": content.get("language") or "en",
                               "parameters": [_text(variables[p]) for p in params]}
        if header:
            out["header_parameters"] = [_text(variables[p]) for p in header]
        if buttons:
            out["buttons"] = [{"sub_type": b["sub_type"], "index": int(b["index"]), "value": _text(variables[b["parameter"]])}
                              for b in buttons]
        return out
    return {"text": fill(content["text"], variables)}
