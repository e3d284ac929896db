"""A hostile tenant's templates against the shared worker (issue #11 items 3 and 4).

The attacker saves templates that compile but blow up, loop or allocate when rendered, with their own API key, and
sends with them through the real worker, while another tenant sends a normal message through the same worker.
Every poison must end failed/render_failed naming its error class, within its retry budget; the other tenant's
message must be sent; the worker's memory must stay small (the big allocations happen, and fail, in a render child).
Saving a template that does not compile, or is larger than its render limit, is refused (422).
"""

from __future__ import annotations

import psycopg
import pytest

from dispatcher import keys
from tests.conftest import Service, call, start_service, stop_service, url_of

pytestmark = pytest.mark.slow

POISONS = {
    "zero": ("{{ 1/0 }}", "ZeroDivisionError"),
    "type": ("{{ name + 1 }}", "TypeError"),
    "range": ("{{ range(99999999999999999999)|list }}", "OverflowError"),
    "big-range": ("{% for i in range(10**9) %}{% endfor %}", "SecurityError"),
    "power": ("{% for i in range(6) %}{{ 99999**99999 }}{% endfor %}", "SecurityError"),
    "repeat": ("{{ 'x' * 100000000 }}", "SecurityError"),
    "busy": ("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}", "RenderTimeout"),
    "memory": ("{{ 'x'.center(400000000) }}", "MemoryError"),
    "output": ("{% for i in range(10000) %}{{ 'y'.center(10000) }}{% endfor %}", "OutputTooLarge"),
}


@pytest.fixture
def svc(db: psycopg.Connection, tmp_path) -> Service:  # noqa: ANN001
    service = start_service(url_of(db), tmp_path, {"DISPATCHER_RENDER_TIMEOUT_MS": "300", "DISPATCHER_RENDER_MEMORY_MB": "256"})
    yield service
    stop_service(service)


def other_tenant_key(svc: Service) -> str:
    with psycopg.connect(svc.db_url, autocommit=True) as conn:
        tenant_id = call(conn, "notify_api.create_tenant_v1('bystander')")["id"]
        key = keys.generate()
        call(conn, "notify_api.create_api_key_v1(%s, 'tests', %s, %s)", tenant_id, keys.display_prefix(key), keys.digest(key))
    return key


def email_intent(ref: str, template: str) -> dict:
    return {
        "recipient": {"ref": ref, "addresses": {"email": f"{ref}@example.com"}},
        "channels": ["email"],
        "template": template,
        "variables": {"name": "Ana"},
    }


def worker_peak_kib(svc: Service) -> int:
    with open(f"/proc/{svc.procs[1].pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_poison_templates_fail_alone_and_the_other_tenant_is_sent(svc: Service) -> None:
    bystander = other_tenant_key(svc)
    with psycopg.connect(svc.db_url, autocommit=True) as conn:
        call(conn, "notify_api.set_retry_policy_v1(%s, 3, 50, 200)", svc.tenant_id)
    ids = {}
    with svc.client() as attacker, svc.client(bystander) as normal:
        for name, (source, _) in POISONS.items():
            saved = attacker.put(f"/internal/templates/{name}", json={"channels": {"email": {"subject": "Hi", "text": source}}})
            assert saved.status_code == 200, saved.text
        assert (
            normal.put(
                "/internal/templates/hello", json={"channels": {"email": {"subject": "Hi {{name}}", "text": "Hello {{name}}"}}}
            ).status_code
            == 200
        )
        for name in POISONS:
            accepted = attacker.post("/internal/notifications", json=email_intent(f"victim-{name}", name))
            assert accepted.status_code == 202, accepted.text
            ids[name] = accepted.json()["id"]
        accepted = normal.post("/internal/notifications", json=email_intent("friend", "hello"))
        assert accepted.status_code == 202
        friend = accepted.json()["id"]

    with svc.client(bystander) as normal:
        deadline_body = None
        for _ in range(300):
            deadline_body = normal.get(f"/internal/notifications/{friend}").json()
            if deadline_body["deliveries"][0]["status"] in ("sent", "delivered"):
                break
            __import__("time").sleep(0.1)
        assert deadline_body["deliveries"][0]["status"] in ("sent", "delivered"), deadline_body
    for name, (_, error_class) in POISONS.items():
        body = svc.wait_for(ids[name], lambda b: b["deliveries"][0]["status"] not in ("queued", "sending"), timeout=30)
        d = body["deliveries"][0]
        assert (d["status"], d["reason"], d["error"]["code"]) == ("failed", "render_failed", "render_failed"), (name, d)
        assert d["error"]["message"].startswith(error_class), (name, d["error"])
        assert d["attempts"] == 1
    assert worker_peak_kib(svc) < 250 * 1024  # the 100-400 MB allocations never happened in the worker


def test_templates_that_do_not_compile_or_are_too_large_are_refused(svc: Service) -> None:
    with svc.client() as c:
        bad = c.put("/internal/templates/broken", json={"channels": {"email": {"subject": "Hi {{ name", "text": "ok"}}})
        assert bad.status_code == 422 and bad.json()["field"] == "channels.email.subject", bad.text
        assert bad.json()["type"].endswith(":invalid_template")
        bad = c.put("/internal/templates/broken", json={"channels": {"sms": {"text": "{% for %}"}}})
        assert bad.status_code == 422 and bad.json()["field"] == "channels.sms.text"
        big = c.put("/internal/templates/big", json={"channels": {"email": {"subject": "Hi", "text": "x" * 65537}}})
        assert big.status_code == 422 and big.json()["field"] == "channels.email.text", big.text
        assert big.json()["type"].endswith(":template_too_large")
        # Compiling never evaluates a hostile literal (Jinja's constant folding is off for filters and big operators).
        folded = c.put(
            "/internal/templates/folded",
            json={"channels": {"email": {"subject": "{{ 'x'|center(2000000000) }}", "text": "{{ 'x' * 2000000000 }}"}}},
        )
        assert folded.status_code == 200
        assert c.get("/internal/templates/", params={"key": "broken"}).json() == []
