"""Test keys end to end through the real HTTP API, worker and fakes: a tenant configured for the Graph API fake and a
local SMTP server; a test key's submissions run the whole path through the mock (every magic address gives its
documented outcome), are marked test in every answer and in the metrics, and neither fake ever sees a request."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest

from cli import commands as cli
from tests.conftest import REMINDER, ROOT, Service, call, free_port, intent, start_service, stop_service, url_of
from tests.fakes.graph_api import GraphFake
from tests.fakes.smtp import SmtpFake

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    svc: Service
    graph: GraphFake
    smtp: SmtpFake
    test_key: str
    metrics_url: str


def configure_real_providers(svc: Service, graph: GraphFake, graph_url: str, smtp_port: int) -> None:
    """The tenant's WhatsApp goes to the Graph API fake, its e-mail to the SMTP fake (as in production)."""
    graph.webhook_url = f"{svc.base_url}/public/webhooks/whatsapp"
    with psycopg.connect(svc.db_url, autocommit=True) as conn:  # the operator: E2E_* secrets, the fakes on this machine
        call(conn, "notify_api.set_provider_grants_v1(%s, 'E2E_', null, true)", svc.tenant_id)
        call(conn, "notify_api.set_retry_policy_v1(%s, 3, 50, 200)", svc.tenant_id)
    with svc.client() as c:
        assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
        wa = c.put(
            "/internal/channels/whatsapp/provider",
            json={
                "provider": "whatsapp_cloud",
                "secrets": {"access_token": "env:E2E_WA_TOKEN"},
                "settings": {"phone_number_id": graph.phone_number_id, "base_url": graph_url, "timeout_seconds": 2},
            },
        )
        assert wa.status_code == 200, wa.text
        email = c.put(
            "/internal/channels/email/provider",
            json={
                "provider": "smtp",
                "settings": {"host": "127.0.0.1", "port": smtp_port, "security": "none", "from_address": "club@runflow.example"},
            },
        )
        assert email.status_code == 200, email.text


def start_stack(
    db: psycopg.Connection,
    tmp_path,
    extra_env: dict[str, str] | None = None,  # noqa: ANN001
) -> tuple[Service, GraphFake, SmtpFake, str]:
    graph, smtp = GraphFake(app_secret="app-secret-test-keys"), SmtpFake()
    graph_url, smtp_port = graph.start(), smtp.start()
    metrics_port = free_port()
    svc = start_service(
        url_of(db),
        tmp_path,
        {
            "DISPATCHER_WHATSAPP_APP_SECRET": graph.app_secret,
            "E2E_WA_TOKEN": graph.access_token,
            "DISPATCHER_WORKER_METRICS_PORT": str(metrics_port),
            **(extra_env or {}),
        },
    )
    graph.base_url = graph_url  # type: ignore[attr-defined]
    configure_real_providers(svc, graph, graph_url, smtp_port)
    return svc, graph, smtp, f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.fixture
def stack(db: psycopg.Connection, tmp_path) -> Iterator[Stack]:  # noqa: ANN001
    svc, graph, smtp, metrics_url = start_stack(db, tmp_path, {"DISPATCHER_DEV_MODE": "1"})  # http callbacks to this machine
    with psycopg.connect(svc.db_url, autocommit=True) as conn:  # the CLI's own function (dispatcher key create --test)
        test_key, info = cli.create_key(conn, svc.tenant_id, "suite", test=True)
    assert info["test"] is True
    yield Stack(svc, graph, smtp, test_key, metrics_url)
    stop_service(svc)
    graph.stop()
    smtp.stop()


def grant(svc: Service, key: str, ref: str) -> None:
    with svc.client(key) as c:
        answer = c.post(
            f"/internal/recipients/{ref}/consents", json={"channel": "whatsapp", "status": "granted", "source": "form"}
        )
        assert answer.status_code == 201, answer.text


def submit(svc: Service, key: str, **overrides: object) -> dict:
    with svc.client(key) as c:
        response = c.post("/internal/notifications", json=intent(**overrides))
        assert response.status_code == 202, response.text
        return response.json()


FINAL = {"delivered", "read", "failed", "bounced", "unknown", "suppressed"}

# address -> (channel, final status, reason, error code): the README's table of magic addresses
MAGIC = {
    "+12025550100": ("whatsapp", "delivered", None, None),
    "+12025550101": ("whatsapp", "read", None, None),
    "+12025550102": ("whatsapp", "failed", "provider_reported", "131026"),
    "+12025550103": ("whatsapp", "failed", "provider_rejected", "mock_rejected"),
    "+12025550104": ("whatsapp", "unknown", "outcome_unknown", "mock_timeout"),
    "+16465550105": ("whatsapp", "read", None, None),  # slow; any area code
    "+12025550106": ("whatsapp", "failed", "retries_exhausted", "mock_503"),
    "delivered@simulator.dispatcher.test": ("email", "delivered", None, None),
    "failed@simulator.dispatcher.test": ("email", "failed", "provider_rejected", "mock_rejected"),
    "failed+5.7.1@simulator.dispatcher.test": ("email", "failed", "provider_rejected", "5.7.1"),
    "bounced@simulator.dispatcher.test": ("email", "bounced", "rejected_by_recipient_server", "550"),
    "bounced+5.1.1@simulator.dispatcher.test": ("email", "bounced", "rejected_by_recipient_server", "5.1.1"),
    "unknown@simulator.dispatcher.test": ("email", "unknown", "outcome_unknown", "mock_timeout"),
    "slow@simulator.dispatcher.test": ("email", "delivered", None, None),
    "retry@simulator.dispatcher.test": ("email", "failed", "retries_exhausted", "mock_503"),
}


def settled(expected: str):  # noqa: ANN201
    """The delivery reached its expected final status (read only after delivered's report, etc.)."""
    return lambda b: b["deliveries"][0]["status"] == expected


def test_every_magic_address_gives_its_outcome_and_no_real_provider_is_called(stack: Stack) -> None:
    svc = stack.svc
    submitted = {}
    for n, (address, (channel, *_)) in enumerate(MAGIC.items()):
        ref = f"magic-{n}"
        if channel == "whatsapp":
            grant(svc, stack.test_key, ref)
        answer = submit(svc, stack.test_key, recipient={"ref": ref, "addresses": {channel: address}}, channels=[channel])
        assert answer["test"] is True and answer["status"] == "accepted", answer
        submitted[address] = answer["id"]
    for address, (_channel, status, reason, code) in MAGIC.items():
        body = svc.wait_for(submitted[address], settled(status), timeout=30)
        d = body["deliveries"][0]
        assert body["test"] is True and d["test"] is True and d["provider"] == "mock", body
        assert (d["status"], d.get("reason"), (d.get("error") or {}).get("code")) == (status, reason, code), (address, d)
    read = svc.wait_for(submitted["+12025550101"], settled("read"))["deliveries"][0]
    assert [e["to"] for e in read["events"]][:3] == ["queued", "sending", "sent"] and read["delivered_at"] and read["read_at"]
    retried = svc.wait_for(submitted["+12025550106"], settled("failed"))["deliveries"][0]
    assert [a["outcome"] for a in retried["attempt_history"]] == ["retry", "retry", "retry"]

    # what the mock "sent" is there to look at, with the test key
    with svc.client(stack.test_key) as c:
        messages = c.get("/internal/mock/messages").json()
    assert {m["address"] for m in messages} >= {"+12025550100", "delivered@simulator.dispatcher.test"}

    # the real providers were configured, and were never called
    assert stack.graph.requests == [] and stack.graph.accepted == []
    assert stack.smtp.received == []

    # the worker's metrics say these were test deliveries
    scraped = httpx.get(stack.metrics_url, timeout=5).text
    assert re.search(r'dispatcher_deliveries_total\{[^}]*provider="mock"[^}]*test="true"[^}]*\} [1-9]', scraped), scraped[-2000:]
    assert not re.search(r'dispatcher_deliveries_total\{[^}]*provider="whatsapp_cloud"', scraped)


def test_the_same_submission_with_a_live_key_reaches_the_real_providers(stack: Stack) -> None:
    """The control: the fakes are wired, so the test above's empty request lists mean something."""
    svc = stack.svc
    grant(svc, svc.key, "live")
    answer = submit(
        svc, svc.key, recipient={"ref": "live", "addresses": {"whatsapp": "+12025550101", "email": "ana@example.com"}}
    )
    assert "test" not in answer
    body = svc.wait_for(
        answer["id"],
        lambda b: (
            {d["status"] for d in b["deliveries"]} <= {"sent", "delivered", "read"}
            and all(d.get("provider") for d in b["deliveries"])
        ),
        timeout=20,
    )
    assert "test" not in body and all("test" not in d for d in body["deliveries"])
    assert {d["provider"] for d in body["deliveries"]} == {"whatsapp_cloud", "smtp"}
    assert len(stack.graph.requests) == 1 and len(stack.smtp.received) == 1


def test_test_keys_are_created_and_listed_by_the_cli_and_rotation_keeps_them_test(stack: Stack) -> None:
    env = {**os.environ, "DATABASE_URL": stack.svc.db_url}

    def run(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "dispatcher", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        ).stdout

    out = run("key", "create", "--tenant", "acme", "--name", "ci-suite", "--test")
    assert "test API key" in out
    key_id = re.search(r"id ([0-9a-f-]{36})", out).group(1)  # type: ignore[union-attr]
    listed = {k["id"]: k for k in __import__("json").loads(run("key", "list", "--tenant", "acme"))}
    assert listed[key_id]["test"] is True and listed[key_id]["name"] == "ci-suite"
    assert any(k["test"] is False for k in listed.values())  # the service's own live key
    rotated = run("key", "rotate", "--tenant", "acme", key_id, "--overlap-seconds", "0")
    new_key = re.search(r"^(nd_\S+)$", rotated, re.M).group(1)  # type: ignore[union-attr]
    grant(stack.svc, new_key, "rotated")
    answer = submit(
        stack.svc, new_key, recipient={"ref": "rotated", "addresses": {"whatsapp": "+12025550100"}}, channels=["whatsapp"]
    )
    assert answer["test"] is True
    stack.svc.wait_for(answer["id"], settled("delivered"))
    assert stack.graph.requests == []


def test_a_test_keys_status_callbacks_are_sent_and_say_test(stack: Stack) -> None:
    """Callbacks are part of the whole path: the caller's endpoint gets every status change, each marked test."""
    from tests.runner.test_callbacks import Receiver

    svc = stack.svc
    with svc.client(stack.test_key) as c:
        port = free_port()
        created = c.put("/internal/callbacks", json={"url": f"http://127.0.0.1:{port}/hooks"})
        assert created.status_code == 200, created.text
        receiver = Receiver(created.json()["secret"])
    receiver.port, receiver.failing = port, False
    receiver.start()
    try:
        grant(svc, stack.test_key, "cb")
        answer = submit(
            svc, stack.test_key, recipient={"ref": "cb", "addresses": {"whatsapp": "+12025550101"}}, channels=["whatsapp"]
        )
        body = svc.wait_for(answer["id"], settled("read"))
        expected = len(body["deliveries"][0]["events"])
        deadline = time.monotonic() + 20
        while len(receiver.events) < expected:
            assert time.monotonic() < deadline, f"{len(receiver.events)} of {expected} callbacks arrived"
            time.sleep(0.1)
        assert [e["data"]["status"] for e in receiver.events][-1] == "read"
        assert all(e["data"].get("test") is True for e in receiver.events)
        assert {e["data"].get("provider") for e in receiver.events} <= {None, "mock"}
    finally:
        receiver.stop()
    assert stack.graph.requests == []
