"""Template rendering and log masking."""

from __future__ import annotations

import logging

import pytest

from dispatcher import keys
from dispatcher.logs import JsonFormatter, mask
from runner.render import RenderError, render


def test_email_renders_text_plain_and_html_escaped():
    out = render("email", {"subject": "Hi {{name}}", "text": "{{ name }} & co", "html": "<p>{{name}}</p>"}, {"name": "<Ana>"})
    assert out == {"subject": "Hi <Ana>", "text": "<Ana> & co", "html": "<p>&lt;Ana&gt;</p>"}


def test_whatsapp_template_parameters_follow_the_mapping():
    out = render(
        "whatsapp", {"name": "event_reminder", "language": "es", "parameters": ["event", "name"]}, {"name": "Ana", "event": 5}
    )
    assert out == {"template": "event_reminder", "language": "es", "parameters": ["5", "Ana"]}


def test_plain_text_conditionals_and_missing_variables():
    assert render("sms", {"text": "Go {{x}}{% if late %}, late{% endif %}"}, {"x": 5, "late": True}) == {"text": "Go 5, late"}
    with pytest.raises(RenderError):
        render("sms", {"text": "Go {{y}}"}, {})
    with pytest.raises(RenderError):
        render("email", None, {})


def test_mask_hides_personal_data_and_secrets():
    key = keys.generate()
    text = mask(f"to +34 600 111 222 / 34600111222 / ana.garcia@example.com key {key} Bearer {key} whsec_abcDEF123=")
    for secret in ("600 111", "34600111222", "ana.garcia", key, "abcDEF123"):
        assert secret not in text
    assert keys.display_prefix(key) in text and "example.com" in text


def test_json_formatter_masks_extra_fields():
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "sent to %s", ("+34600111222",), None)
    record.address = "ana@example.com"
    line = JsonFormatter().format(record)
    assert "+34600111222" not in line and "ana@example.com" not in line and '"event":"sent to ***22"' in line


def test_the_sandbox_refuses_unsafe_templates():
    with pytest.raises(RenderError):
        render("sms", {"text": "{{ x.__class__.__mro__[1].__subclasses__() }}"}, {"x": "a"})
    with pytest.raises(RenderError):
        render("sms", {"text": "{% if %}"}, {})


def test_subjects_cannot_inject_headers():
    out = render("email", {"subject": "Hi {{name}}", "text": "t"}, {"name": "A\r\nBcc: evil@example.com"})
    assert "\n" not in out["subject"] and "\r" not in out["subject"]


@pytest.mark.parametrize(
    ("channel", "content", "isolated"),
    [
        (
            "email",
            {"subject": "Reminder: {{event}}", "text": "Hi {{ name }}, see you at {{event}}.", "html": "<p>{{name}}</p>"},
            False,
        ),
        ("whatsapp", {"name": "event_reminder", "language": "en", "parameters": ["name"]}, False),
        ("sms", {"text": "plain text, no placeholder"}, False),
        ("email", {"subject": "s", "text": "{{ 9 ** 9 }}"}, True),
        ("email", {"subject": "{% for i in range(3) %}x{% endfor %}", "text": "t"}, True),
        ("email", {"subject": "s", "text": "{{ name | upper }}"}, True),
        ("email", {"subject": "s", "text": "{{ a.b }}"}, True),
        ("email", {"subject": "s", "text": "{{ 'x' * 3 }}"}, True),
        ("email", {"subject": "s", "text": "{{ name }}", "html": "{{ f() }}"}, True),
        ("sms", {"text": "{% if a %}y{% endif %}"}, True),
        ("sms", {"text": "{{ unclosed"}, True),
    ],
)
def test_only_bare_placeholders_render_without_isolation(channel, content, isolated):
    from dispatcher.render import needs_isolation

    assert needs_isolation(channel, content) is isolated


def test_bare_placeholders_render_in_the_worker_and_the_rest_in_the_children():
    import asyncio

    from dispatcher.settings import Settings
    from runner.render_pool import RenderPool

    pool = RenderPool(Settings(database_url="postgresql:///unused"))
    items = [
        (1, {"subject": "Hi {{name}}", "text": "{{name}}"}, {"name": "Ana"}),
        (2, {"subject": "s", "text": "{% for i in range(2) %}{{name}}{% endfor %}"}, {"name": "Bo"}),
        (1, {"subject": "Hi {{name}}", "text": "{{name}}"}, {}),
        (3, {"subject": "s", "text": "{{ 1 / 0 }}"}, {}),
    ]
    try:
        out = asyncio.run(pool.render("email", items))
    finally:
        pool.close()
    assert out[0] == (True, {"subject": "Hi Ana", "text": "Ana"})
    assert out[1] == (True, {"subject": "s", "text": "BoBo"})
    assert out[2][0] is False and "UndefinedError" in out[2][1]
    assert out[3][0] is False and out[3][1].startswith("ZeroDivisionError")


def test_a_provider_instance_nobody_uses_any_more_is_closed_and_dropped():
    """A tenant that keeps changing its settings gets a new instance each time; the old ones must not pile up."""
    import asyncio

    from dispatcher.settings import Settings
    from runner import drainer

    async def scenario() -> tuple[int, int, bool]:
        worker = drainer.DeliveryDrainer(None, Settings(database_url="postgresql:///unused"))
        first = worker.provider("mock", {"v": 1})
        closed = []

        async def aclose() -> None:
            closed.append(True)

        first.aclose = aclose  # type: ignore[method-assign]
        for v in range(2, 6):
            worker.provider("mock", {"v": v})
        before = len(worker.providers)
        idle = drainer.time.monotonic() - drainer.PROVIDER_IDLE_SECONDS - 1  # as if last used that long ago
        worker._used = dict.fromkeys(worker._used, idle)
        worker._pruned_at = idle
        worker.provider("mock", {"v": 99})  # the next use prunes what has been idle
        await asyncio.sleep(0.01)
        after = len(worker.providers)
        worker.renderer.close()
        return before, after, bool(closed)

    before, after, closed = asyncio.run(scenario())
    assert (before, after, closed) == (5, 1, True)
