"""Renders template content with a delivery's variables: {{name}} placeholders, values HTML-escaped in html."""

from __future__ import annotations

import html
import re
from typing import Any

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class RenderError(Exception):
    """The content cannot be rendered (template deleted, variable missing): the delivery fails."""


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def fill(template: str, variables: dict[str, Any], *, escape: bool = False) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            raise RenderError(f"variable {name} missing")
        value = _text(variables[name])
        return html.escape(value) if escape else value

    return PLACEHOLDER.sub(one, template)


def render(channel: str, content: dict[str, Any] | None, variables: dict[str, Any]) -> dict[str, Any]:
    if content is None:
        raise RenderError("template content not found")
    if channel == "email":
        out = {"subject": fill(content["subject"], variables), "text": fill(content["text"], variables)}
        if content.get("html"):
            out["html"] = fill(content["html"], variables, escape=True)
        return out
    if channel == "whatsapp" and "name" in content:
        params = content.get("parameters") or []
        missing = [p for p in params if p not in variables]
        if missing:
            raise RenderError(f"variable {missing[0]} missing")
        return {"template": content["name"], "language": content.get("language") or "en",
                "parameters": [_text(variables[p]) for p in params]}
    return {"text": fill(content["text"], variables)}
