"""The dry run's rendering: notify_api.preview_notification_v1 answers each delivery's template content (after locale
fallback) and merged variables; this renders them with the worker's renderer (dispatcher.render) in the worker's
bounded pool (dispatcher.render_pool: child processes, a time budget and an address-space limit per render), so a
preview shows exactly the text a send would, and a slow or huge template fails alone, as `render_failed`, without
stalling the caller's event loop. Used by POST /internal/notifications/preview and `dispatcher notifications preview`.
"""

from __future__ import annotations

from typing import Any

from dispatcher.render_pool import RenderPool


def _renderable(delivery: dict[str, Any]) -> bool:
    """A delivery the worker would render: its template content exists and no variable it needs is missing (the
    preview names those reasons itself)."""
    return isinstance(delivery.get("template", {}).get("content"), dict) and not delivery.get("missing_variables")


async def render_preview(answer: dict[str, Any], pool: RenderPool) -> dict[str, Any]:
    """Adds `rendered` to each renderable delivery of a preview answer (in place; returned for convenience). A render
    that fails (a syntax error, a missing variable deep in the template, a time or size bound) adds the reason
    `render_failed` with the renderer's message and makes `would_send` false: a send would fail the same way."""
    deliveries = answer.get("deliveries") or []
    by_channel: dict[str, list[dict[str, Any]]] = {}
    for delivery in deliveries:
        if _renderable(delivery):
            by_channel.setdefault(delivery["channel"], []).append(delivery)
    for channel, group in by_channel.items():
        items = [
            ((t.get("key"), t.get("locale"), t.get("version")), t["content"], d.get("variables") or {})
            for d in group
            for t in (d["template"],)
        ]
        try:
            outcomes = await pool.render(channel, items)
        except Exception as exc:  # noqa: BLE001 - the pool itself broke: each of these deliveries says so
            outcomes = [(False, f"RenderCrashed: {type(exc).__name__}")] * len(group)
        for delivery, (ok, rendered) in zip(group, outcomes, strict=True):
            if ok:
                delivery["rendered"] = rendered
            else:
                delivery.setdefault("reasons", []).append({"reason": "render_failed", "detail": str(rendered)})
                delivery["would_send"] = False
    return answer
