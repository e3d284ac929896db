"""Provider failover through the real worker (runner/drainer.py's DeliveryDrainer on a procrastinate connector logged in
as the application role), real Postgres and real fakes over sockets: two SMTP relays of which the first refuses
connections, two Twilio accounts of which the first refuses (401, 503), an ambiguous Twilio outcome that must not fail
over, and demotion after N "not sent" errors, shared through Postgres and ending after D seconds."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from procrastinate import PsycopgConnector
from prometheus_client import REGISTRY
from psycopg.types.json import Jsonb

from dispatcher.settings import Settings
from runner.drainer import DeliveryDrainer
from tests.conftest import REMINDER, ROOT, app_url, call, free_port, intent, submit
from tests.fakes.graph_api import GraphFake
from tests.fakes.smtp import SmtpFake
from tests.fakes.twilio import TwilioFake

PUBLIC = "https://notify.example.com"
PHONE = "+34600111222"


@pytest.fixture
def chained(db: psycopg.Connection, tenant: str) -> str:
    """A tenant with the reminder template, SMS consent for runner-42, and the operator's grant for fakes on this
    machine (FAILOVER_* secrets, private endpoints)."""
    call(db, "notify_api.set_provider_grants_v1(%s, 'FAILOVER_', null, true)", tenant)
    call(db, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", tenant, Jsonb(REMINDER))
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        tenant,
        Jsonb({"channel": "sms", "status": "granted", "source": "signup_form"}),
    )
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        tenant,
        Jsonb({"channel": "whatsapp", "status": "granted", "source": "signup_form"}),
    )
    return tenant


def relay(port: int) -> dict[str, Any]:
    return {
        "provider": "smtp",
        "settings": {
            "host": "127.0.0.1",
            "port": port,
            "security": "none",
            "from_address": "club@runflow.example",
            "timeout_seconds": 2,
        },
    }


def twilio_entry(fake: TwilioFake, url: str, number: str, token_env: str) -> dict[str, Any]:
    return {
        "provider": "twilio",
        "settings": {"account_sid": fake.account_sid, "from_number": number, "base_url": url, "timeout_seconds": 1},
        "secrets": {"auth_token": f"env:{token_env}"},
    }


def set_chain(db: psycopg.Connection, tenant: str, channel: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return call(db, "notify_api.set_channel_providers_v1(%s, %s::notify.channel, %s)", tenant, channel, Jsonb(list(entries)))


def submit_to(db: psycopg.Connection, tenant: str, channel: str, ref: str = "runner-42") -> str:
    addresses = {"email": f"{ref}@example.com", "sms": PHONE, "whatsapp": PHONE}
    body = intent(channels=[channel], recipient={"ref": ref, "addresses": {channel: addresses[channel]}, "locale": "en"})
    response, _ = submit(db, tenant, body)
    return response["id"]


def drain(db_url: str, channel: str, **settings: Any) -> dict[str, int]:
    """One worker's drain of the channel (until nothing is due), as `dispatch` runs it."""

    async def run() -> dict[str, int]:
        connector = PsycopgConnector(conninfo=app_url(db_url))
        await connector.open_async()
        drainer = DeliveryDrainer(connector, Settings(database_url=db_url, public_url=PUBLIC, dispatch_linger_ms=0, **settings))
        try:
            return await drainer.drain(channel)
        finally:
            await drainer.aclose()
            await connector.close_async()

    return asyncio.run(run())


def deliveries(db: psycopg.Connection, tenant: str) -> list[dict[str, Any]]:
    rows = db.execute(
        """select d.id, d.status::text, d.attempt, a.attempt, a.provider, a.outcome, a.error_code, a.error_message
             from notify.notification_deliveries d
             left join notify.delivery_attempts a on a.tenant_id = d.tenant_id and a.delivery_id = d.id
            where d.tenant_id = %s order by d.created_at, a.attempt""",
        (tenant,),
    ).fetchall()
    keys = ("id", "status", "attempts", "attempt", "provider", "outcome", "error_code", "error_message")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def chain_of(db: psycopg.Connection, tenant: str, channel: str) -> list[dict[str, Any]]:
    return next(c for c in call(db, "notify_api.list_channel_providers_v1(%s)", tenant) if c["channel"] == channel)["chain"]


@pytest.fixture
def smtp_fake() -> Iterator[tuple[SmtpFake, int]]:
    fake = SmtpFake()
    port = fake.start()
    yield fake, port
    fake.stop()


@pytest.fixture
def twilios() -> Iterator[tuple[TwilioFake, str, TwilioFake, str]]:
    first, second = TwilioFake(account_sid="AC" + "1" * 32), TwilioFake(account_sid="AC" + "2" * 32, auth_token="second-token")
    urls = first.start(), second.start()
    yield first, urls[0], second, urls[1]
    first.stop()
    second.stop()


def failovers(channel: str, provider: str) -> float:
    return REGISTRY.get_sample_value("dispatcher_provider_failovers_total", {"channel": channel, "provider": provider}) or 0.0


def test_a_relay_that_refuses_connections_hands_the_message_to_the_next_in_the_same_attempt(db, db_url, chained, smtp_fake):
    fake, port = smtp_fake
    down = free_port()  # nothing listens there: connection refused
    set_chain(db, chained, "email", relay(down), relay(port))
    submit_to(db, chained, "email")
    before = failovers("email", "smtp")
    drain(db_url, "email")
    [row] = deliveries(db, chained)
    assert row["status"] == "sent" and row["attempts"] == 1 and row["attempt"] == 1  # one attempt row
    assert row["provider"] == "smtp" and row["outcome"] == "sent" and row["error_code"] is None
    # the history keeps the first relay's refusal
    assert row["error_message"].startswith("failed over from smtp (position 0): smtp_unavailable")
    assert len(fake.received) == 1 and fake.received[0].recipients == ["runner-42@example.com"]
    assert failovers("email", "smtp") == before + 1
    # the refusal counted against position 0, the success of position 1 left nothing to reset
    chain = chain_of(db, chained, "email")
    assert [c["health"]["errors"] for c in chain] == [1, 0]


def test_without_a_next_provider_a_refused_connection_is_retried_as_today(db, db_url, chained):
    set_chain(db, chained, "email", relay(free_port()))
    submit_to(db, chained, "email")
    drain(db_url, "email")
    [row] = deliveries(db, chained)
    assert row["status"] == "queued" and row["outcome"] == "retry" and row["error_code"] == "smtp_unavailable"
    assert not row["error_message"].startswith("failed over")
    assert chain_of(db, chained, "email")[0]["health"]["errors"] == 0  # no chain, no health kept


@pytest.mark.parametrize("refusal", ["credentials", "http503", "error:20429"])
def test_a_twilio_account_that_refuses_before_accepting_fails_over_to_the_second(
    db, db_url, chained, twilios, monkeypatch, refusal
):
    first, first_url, second, second_url = twilios
    monkeypatch.setenv("FAILOVER_TW1", "not-the-token" if refusal == "credentials" else first.auth_token)
    monkeypatch.setenv("FAILOVER_TW2", second.auth_token)
    if refusal != "credentials":
        first.scripts[PHONE] = [refusal]
    set_chain(
        db,
        chained,
        "sms",
        twilio_entry(first, first_url, "+15005550006", "FAILOVER_TW1"),
        twilio_entry(second, second_url, "+15005550007", "FAILOVER_TW2"),
    )
    submit_to(db, chained, "sms")
    drain(db_url, "sms")
    [row] = deliveries(db, chained)
    assert row["status"] == "sent" and row["attempts"] == 1 and row["provider"] == "twilio"
    assert len(first.requests) == 1 and len(second.requests) == 1
    assert second.requests[0]["form"]["From"] == "+15005550007"
    expected = {"credentials": "twilio_20003", "http503": "twilio_20503", "error:20429": "twilio_20429"}[refusal]
    assert row["error_message"].startswith(f"failed over from twilio (position 0): {expected}")


@pytest.mark.parametrize("ambiguous", ["timeout", "reset", "http500"])
def test_an_ambiguous_twilio_outcome_never_fails_over(db, db_url, chained, twilios, monkeypatch, ambiguous):
    first, first_url, second, second_url = twilios
    monkeypatch.setenv("FAILOVER_TW1", first.auth_token)
    monkeypatch.setenv("FAILOVER_TW2", second.auth_token)
    first.scripts[PHONE] = [ambiguous]
    set_chain(
        db,
        chained,
        "sms",
        twilio_entry(first, first_url, "+15005550006", "FAILOVER_TW1"),
        twilio_entry(second, second_url, "+15005550007", "FAILOVER_TW2"),
    )
    submit_to(db, chained, "sms")
    drain(db_url, "sms")
    [row] = deliveries(db, chained)
    assert row["status"] == "unknown" and row["attempts"] == 1
    assert len(first.requests) == 1
    assert second.requests == []  # the second account received nothing: the message may exist at the first
    assert not (row["error_message"] or "").startswith("failed over")


def test_demotion_after_n_errors_is_shared_through_postgres_and_shown_to_operators(db, db_url, chained, smtp_fake):
    fake, port = smtp_fake
    set_chain(db, chained, "email", relay(free_port()), relay(port))
    for n in range(2):
        submit_to(db, chained, "email", ref=f"runner-{n}")
    demotions = REGISTRY.get_sample_value("dispatcher_provider_demotions_total", {"channel": "email", "provider": "smtp"}) or 0.0
    drain(db_url, "email", failover_demote_errors=2, failover_window_seconds=600, failover_demote_seconds=600)
    assert (
        REGISTRY.get_sample_value("dispatcher_provider_demotions_total", {"channel": "email", "provider": "smtp"})
        == demotions + 1
    )
    assert [r["status"] for r in deliveries(db, chained)] == ["sent", "sent"]
    assert len(fake.received) == 2
    health = chain_of(db, chained, "email")[0]["health"]
    assert health["demoted"] is True and health["demotions"] == 1 and health["last_error_code"] == "smtp_unavailable"

    # Another worker (its own connection, as the application role) claims: the demoted relay is last.
    other = psycopg.connect(app_url(db_url), autocommit=True)
    try:
        submit_to(db, chained, "email", ref="runner-9")
        [(position, fallbacks)] = other.execute(
            "select provider_position, fallbacks from notify_api.claim_deliveries_v1('email', 10, 60)"
        ).fetchall()
        assert position == 1 and [f["position"] for f in fallbacks] == [0]
    finally:
        other.close()

    # The operator's view and the metrics say so.
    [(tenant, channel, position, provider, demoted)] = db.execute(
        "select tenant, channel::text, position, provider, demoted from notify_api.provider_health_v1()"
    ).fetchall()
    assert (tenant, channel, position, provider, demoted) == ("acme", "email", 0, "smtp", True)
    from dispatcher.metrics import QueueHealth

    samples = {
        tuple(s.labels.values()): s.value
        for family in QueueHealth(app_url(db_url)).collect()
        if family.name == "dispatcher_providers_demoted"
        for s in family.samples
    }
    assert samples == {("acme", "email"): 1.0}

    status = subprocess.run(
        [sys.executable, "-m", "dispatcher", "status"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": app_url(db_url)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "provider demoted until" in status and "tenant acme email position 0 (smtp), last error smtp_unavailable" in status


def test_a_demotion_ends_by_itself_after_d_seconds(db, db_url, chained, smtp_fake):
    fake, port = smtp_fake
    set_chain(db, chained, "email", relay(free_port()), relay(port))
    submit_to(db, chained, "email")
    drain(db_url, "email", failover_demote_errors=1, failover_window_seconds=600, failover_demote_seconds=1)
    assert len(fake.received) == 1
    assert chain_of(db, chained, "email")[0]["health"]["demotions"] == 1
    # Polled, never timed: demoted now or already over, it must end.
    deadline = time.monotonic() + 30
    while chain_of(db, chained, "email")[0]["health"]["demoted"]:
        assert time.monotonic() < deadline, "the demotion did not end"
        time.sleep(0.2)
    submit_to(db, chained, "email", ref="runner-10")
    rows = db.execute("select provider_position, fallbacks from notify_api.claim_deliveries_v1('email', 10, 60)").fetchall()
    assert rows and all(position == 0 and [f["position"] for f in fallbacks] == [1] for position, fallbacks in rows)


def test_with_every_provider_demoted_they_are_tried_in_order_and_a_success_ends_the_demotion(db, db_url, chained, smtp_fake):
    fake, port = smtp_fake
    set_chain(db, chained, "email", relay(port), relay(free_port()))
    both = [
        {"tenant_id": chained, "channel": "email", "position": p, "failures": 1, "successes": 0, "error_code": "x"}
        for p in (0, 1)
    ]
    call(db, "notify_api.record_provider_health_v1(%s, 1, 60, 3600)", Jsonb(both))
    assert [c["health"]["demoted"] for c in chain_of(db, chained, "email")] == [True, True]
    submit_to(db, chained, "email")
    drain(db_url, "email")
    [row] = deliveries(db, chained)
    assert row["status"] == "sent" and row["error_message"] is None  # the primary, first: nothing failed over
    assert len(fake.received) == 1
    health = [c["health"] for c in chain_of(db, chained, "email")]
    assert health[0]["demoted"] is False and health[0]["last_success_at"] is not None  # its success ended it
    assert health[1]["demoted"] is True  # untried: still demoted


@pytest.fixture
def graphs() -> Iterator[tuple[GraphFake, str, GraphFake, str]]:
    first, second = GraphFake(phone_number_id="111111111111111"), GraphFake(phone_number_id="222222222222222")
    urls = first.start(), second.start()
    yield first, urls[0], second, urls[1]
    first.stop()
    second.stop()


def whatsapp_entry(fake: GraphFake, url: str, token_env: str) -> dict[str, Any]:
    return {
        "provider": "whatsapp_cloud",
        "settings": {"phone_number_id": fake.phone_number_id, "base_url": url, "timeout_seconds": 1},
        "secrets": {"access_token": f"env:{token_env}"},
    }


@pytest.mark.parametrize(("script", "fails_over"), [("bad_token", True), ("timeout", False), ("http500", False)])
def test_whatsapp_fails_over_on_a_refused_token_and_never_on_an_ambiguous_outcome(
    db, db_url, chained, graphs, monkeypatch, script, fails_over
):
    first, first_url, second, second_url = graphs
    monkeypatch.setenv("FAILOVER_WA1", "expired-token" if script == "bad_token" else first.access_token)
    monkeypatch.setenv("FAILOVER_WA2", second.access_token)
    if script != "bad_token":
        first.scripts[PHONE.lstrip("+")] = [script]
    set_chain(
        db,
        chained,
        "whatsapp",
        whatsapp_entry(first, first_url, "FAILOVER_WA1"),
        whatsapp_entry(second, second_url, "FAILOVER_WA2"),
    )
    submit_to(db, chained, "whatsapp")
    drain(db_url, "whatsapp")
    [row] = deliveries(db, chained)
    assert row["attempts"] == 1 and len(first.requests) == 1
    if fails_over:
        assert row["status"] == "sent" and len(second.requests) == 1 and second.accepted == [PHONE.lstrip("+")]
        assert row["error_message"].startswith("failed over from whatsapp_cloud (position 0): whatsapp_190")
    else:
        assert row["status"] == "unknown" and second.requests == []  # the message may exist at the first number


def test_the_cli_replaces_a_chain_and_names_a_bad_entry(db, db_url, chained, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dispatcher", "provider", "chain", "--tenant", "acme", "--channel", "email", *args],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": db_url},
            capture_output=True,
            text=True,
        )

    chain = tmp_path / "chain.json"
    chain.write_text(json.dumps([relay(2525), relay(2526)]))
    done = cli(f"@{chain}")
    assert done.returncode == 0, done.stderr
    assert [c["settings"]["port"] for c in json.loads(done.stdout)["chain"]] == [2525, 2526]
    bad = cli(json.dumps([relay(2525), {"provider": "smtp", "settings": {"host": "127.0.0.1"}}]))
    assert bad.returncode != 0 and "providers[1]" in bad.stderr
    assert [c["settings"]["port"] for c in chain_of(db, chained, "email")] == [2525, 2526]


def test_no_failover_once_the_lease_would_not_cover_the_next_provider(db, db_url, chained, smtp_fake):
    """A chain's first relay answers nothing (its connect phase times out: "not sent"), long enough for the claim's lease
    to expire meanwhile and maintenance to requeue the e-mail (another worker may claim it again). Failing over then
    would send through the second relay a message the queue no longer holds as in flight: the second claim sends it
    again, a duplicate of a message that was never ambiguous. The worker moves on only while the lease still covers the
    next provider."""
    import socket
    import threading

    fake, port = smtp_fake
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes the connection; nobody ever greets
    try:
        slow = relay(silent.getsockname()[1])
        slow["settings"]["timeout_seconds"] = 4
        set_chain(db, chained, "email", slow, relay(port))
        submit_to(db, chained, "email")
        stop = threading.Event()

        def maintenance() -> None:
            # Polled, not timed: as soon as the first claim's lease has expired, maintenance runs once, as it would
            # every 10 s.
            with psycopg.connect(db_url, autocommit=True) as conn:
                while not stop.is_set():
                    expired = conn.execute(
                        "select bool_or(lease_expires_at < now()) from notify.notification_deliveries where tenant_id = %s",
                        (chained,),
                    ).fetchone()[0]
                    if expired:
                        conn.execute("select notify_api.run_maintenance_v1()")
                        return
                    time.sleep(0.05)

        thread = threading.Thread(target=maintenance, daemon=True)
        thread.start()
        try:
            drain(db_url, "email", lease_seconds=1)
        finally:
            stop.set()
            thread.join(10)
    finally:
        silent.close()
    # Never twice; and never through the second relay after the lease that covered the attempt had expired.
    assert len(fake.received) <= 1, [r.recipients for r in fake.received]
    assert fake.received == []


@pytest.mark.parametrize("second_window_open", [False, True])
def test_free_form_whatsapp_text_fails_over_only_to_a_number_whose_window_is_open(
    db, db_url, chained, graphs, monkeypatch, second_window_open
):
    """Free-form text may go only through a number the recipient wrote to in the last 24 hours (the window is per
    business number; the claim checks it for the provider tried first). The first number's token is refused ("not
    sent"): failing over to the second number, whose window is closed, sends what Meta refuses (131047) and turns a
    message that would have been retried into a failed one. It stays with the first number's retry; a second number
    whose window is open takes it."""
    first, first_url, second, second_url = graphs
    monkeypatch.setenv("FAILOVER_WA1", "expired-token")
    monkeypatch.setenv("FAILOVER_WA2", second.access_token)
    call(db, "notify_api.upsert_template_v1(%s, 'chat', %s)", chained, Jsonb({"channels": {"whatsapp": {"text": "Hi {{name}}"}}}))
    set_chain(
        db,
        chained,
        "whatsapp",
        whatsapp_entry(first, first_url, "FAILOVER_WA1"),
        whatsapp_entry(second, second_url, "FAILOVER_WA2"),
    )
    # The recipient wrote to the first number (and, in the second case, to the second one too).
    for fake in (first, second) if second_window_open else (first,):
        db.execute(
            "insert into notify.whatsapp_windows values (%s, %s, %s, now())", (chained, fake.phone_number_id, PHONE.lstrip("+"))
        )
    body = intent(
        channels=["whatsapp"], template="chat", recipient={"ref": "runner-42", "addresses": {"whatsapp": PHONE}, "locale": "en"}
    )
    submit(db, chained, body)
    drain(db_url, "whatsapp")
    [row] = deliveries(db, chained)
    assert len(first.requests) == 1
    if second_window_open:
        assert row["status"] == "sent" and second.accepted == [PHONE.lstrip("+")]
        assert row["error_message"].startswith("failed over from whatsapp_cloud (position 0): whatsapp_190")
    else:
        assert second.requests == []  # its window is closed: never sent there
        assert row["status"] == "queued" and row["outcome"] == "retry" and row["error_code"] == "whatsapp_190"


def test_a_demoted_number_with_the_open_window_still_takes_free_form_text(db, db_url, chained, graphs, monkeypatch):
    """The recipient wrote to the first number; the first number is demoted (a token hiccup an hour ago), so the claim
    tries the second number first, whose window is closed: the text must not fail as "outside the customer-service
    window" while a number of the chain has the window open. It goes through the first number."""
    first, first_url, second, second_url = graphs
    monkeypatch.setenv("FAILOVER_WA1", first.access_token)
    monkeypatch.setenv("FAILOVER_WA2", second.access_token)
    call(db, "notify_api.upsert_template_v1(%s, 'chat', %s)", chained, Jsonb({"channels": {"whatsapp": {"text": "Hi {{name}}"}}}))
    set_chain(
        db,
        chained,
        "whatsapp",
        whatsapp_entry(first, first_url, "FAILOVER_WA1"),
        whatsapp_entry(second, second_url, "FAILOVER_WA2"),
    )
    demote = [{"tenant_id": chained, "channel": "whatsapp", "position": 0, "failures": 1, "successes": 0, "error_code": "x"}]
    call(db, "notify_api.record_provider_health_v1(%s, 1, 60, 3600)", Jsonb(demote))
    db.execute(
        "insert into notify.whatsapp_windows values (%s, %s, %s, now())", (chained, first.phone_number_id, PHONE.lstrip("+"))
    )
    body = intent(
        channels=["whatsapp"], template="chat", recipient={"ref": "runner-42", "addresses": {"whatsapp": PHONE}, "locale": "en"}
    )
    submit(db, chained, body)
    drain(db_url, "whatsapp")
    [row] = deliveries(db, chained)
    assert row["status"] == "sent", row
    assert first.accepted == [PHONE.lstrip("+")] and second.requests == []
