"""The SMTP provider against a real local SMTP server (aiosmtpd): headers, body, encoding, TLS, AUTH,
and every class of reply taking its path."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from dispatcher.settings import Settings
from providers.base import Message, ProviderContext, ProviderSettings
from providers.secrets import Grants
from providers.smtp import Smtp
from providers.unsubscribe import check_token
from tests.fakes.smtp import SmtpFake

TENANT = uuid.uuid4()
LOCAL = Grants(env_prefix="TEST_", private_endpoints=True)  # the operator's grant for a relay on this machine


async def _no_tokens(key: str, rate: float, wanted: int) -> int:
    raise AssertionError("SMTP does not pace through the database")


async def _no_mock(rows: list) -> None:
    raise AssertionError("SMTP does not use the mock outbox")


def ctx(**settings: object) -> ProviderContext:
    return ProviderContext(
        take_tokens=_no_tokens, record_mock=_no_mock, settings=ProviderSettings.of(Settings(database_url="", **settings))
    )  # type: ignore[arg-type]


@pytest.fixture
def server() -> Iterator[SmtpFake]:
    fake = SmtpFake()
    fake.port = fake.start()  # type: ignore[attr-defined]
    yield fake
    fake.stop()


def message(address: str = "ana@example.com", category: str | None = "reminders", **rendered: str) -> Message:
    content = {"subject": "Recordatorio: Tirada ñ 🏃", "text": "Hola Ana,\nnos vemos el domingo.", **rendered}
    return Message(
        tenant_id=TENANT,
        delivery_id=uuid.uuid4(),
        attempt=1,
        channel="email",
        address=address,
        rendered=content,
        category=category,
    )


def smtp(port: int, context: ProviderContext | None = None, **settings: object) -> Smtp:
    base = {
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "from_address": "club@runflow.example",
        "from_name": "RunFlow Club",
        "timeout_seconds": 5,
        "transactional_categories": ["transactional"],
    }
    return Smtp({**base, **settings}, {}, context or ctx(), LOCAL)


def send(provider: Smtp, *messages: Message) -> list:
    return asyncio.run(provider.send_many(list(messages)))


def test_a_message_arrives_with_the_right_headers_body_and_encoding(server):
    m = message(html="<p>Hola &lt;Ana&gt;</p>")
    [result] = send(smtp(server.port, esp="sendgrid"), m)
    assert result.outcome == "sent" and result.provider_message_id == f"{m.delivery_id}@runflow.example"
    [got] = server.received
    msg = got.message
    assert got.sender == "club@runflow.example" and got.recipients == ["ana@example.com"]
    assert msg["From"] == "RunFlow Club <club@runflow.example>" and msg["To"] == "ana@example.com"
    assert msg["Subject"] == "Recordatorio: Tirada ñ 🏃"
    assert msg["Message-ID"] == f"<{m.delivery_id}@runflow.example>"
    assert msg["X-Dispatcher-Correlation"] == f"{TENANT}:{m.delivery_id}"
    assert f'"nd_correlation": "{TENANT}:{m.delivery_id}"' in msg["X-SMTPAPI"]
    assert msg.get_body(("plain",)).get_content().replace("\r\n", "\n") == "Hola Ana,\nnos vemos el domingo.\n"
    assert msg.get_body(("html",)).get_content().strip() == "<p>Hola &lt;Ana&gt;</p>"
    assert b"=?utf-8?" in got.raw.lower()  # the non-ASCII subject is encoded, not raw 8-bit


def test_non_transactional_mail_gets_one_click_unsubscribe(server):
    provider = smtp(server.port, ctx(public_url="https://notify.example", unsubscribe_secret="u-secret"))
    marketing, transactional, uncategorized = (
        message(category="newsletter"),
        message(category="transactional"),
        message(category=None),
    )
    send(provider, marketing, transactional, uncategorized)
    by_id = {r.message["Message-ID"].strip("<>").split("@")[0]: r.message for r in server.received}
    header = by_id[str(marketing.delivery_id)]["List-Unsubscribe"]
    assert header.startswith("<https://notify.example/public/unsubscribe/") and header.endswith(">")
    assert by_id[str(marketing.delivery_id)]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    token = header.strip("<>").rsplit("/", 1)[1]
    assert check_token("u-secret", token) == (TENANT, marketing.delivery_id)
    assert check_token("other-secret", token) is None
    assert by_id[str(transactional.delivery_id)]["List-Unsubscribe"] is None
    assert by_id[str(uncategorized.delivery_id)]["List-Unsubscribe"] is None


@pytest.mark.parametrize(
    ("script", "outcome", "code"),
    [
        ("rcpt:550 5.1.1 No such user", "bounced", "smtp_550"),
        ("rcpt:451 4.3.0 Try later", "retry", "smtp_451"),
        ("rcpt:452 4.2.2 Mailbox full", "retry", "smtp_452"),
        ("rcpt:552 5.3.4 Too many recipients", "retry", "smtp_552"),
        ("rcpt:550 5.7.1 Relaying denied", "retry", "smtp_550"),
        ("data:554 5.7.1 Message rejected as spam", "failed", "smtp_554"),
        ("data:451 4.7.1 Greylisted", "retry", "smtp_451"),
    ],
)
def test_replies_are_classified_where_they_happen(server, script, outcome, code):
    server.scripts["x@example.com"] = script
    [result] = send(smtp(server.port), message("x@example.com"))
    assert (result.outcome, result.error_code) == (outcome, code)
    assert script.split(":", 1)[1].split()[0] in result.error_message
    assert server.received == []


def test_a_timeout_inside_data_is_ambiguous_and_email_retries(server):
    server.scripts["slow@example.com"] = "data:timeout"
    [result] = send(smtp(server.port, timeout_seconds=1), message("slow@example.com"))
    assert (result.outcome, result.error_code) == ("retry", "smtp_ambiguous")


def test_an_unreachable_relay_is_retried():
    [result] = send(smtp(1, timeout_seconds=1), message())
    assert (result.outcome, result.error_code) == ("retry", "smtp_unavailable")


def test_starttls_and_auth(monkeypatch):
    fake = SmtpFake(require_tls_auth=True)
    port = fake.start()
    try:
        monkeypatch.setenv("TEST_SMTP_PASSWORD", "s3cret")
        secure = {"security": "starttls", "validate_certs": False, "username": "mailer"}
        provider = Smtp({**smtp(port)._settings, **secure}, {"password": "env:TEST_SMTP_PASSWORD"}, ctx(), LOCAL)
        [ok] = send(provider, message())
        assert ok.outcome == "sent" and len(fake.received) == 1
        monkeypatch.setenv("TEST_SMTP_PASSWORD", "wrong")
        [refused] = send(provider, message())
        assert refused.outcome == "retry" and refused.error_code == "smtp_535"
        assert refused.not_sent  # refused credentials: the relay accepted nothing (a chain fails over)
        plain = smtp(port, security="none")
        [no_tls] = send(plain, message())
        assert no_tls.outcome == "retry" and len(fake.received) == 1
        monkeypatch.delenv("TEST_SMTP_PASSWORD")
        [missing] = send(provider, message())
        assert (missing.outcome, missing.error_code) == ("retry", "secret_missing") and missing.not_sent
    finally:
        fake.stop()


def test_many_recipients_in_one_batch(server):
    messages = [message(f"r{i}@example.com") for i in range(20)]
    results = send(smtp(server.port, max_connections=4), *messages)
    assert [r.outcome for r in results] == ["sent"] * 20
    assert sorted(r.recipients[0] for r in server.received) == sorted(m.address for m in messages)


def test_implicit_tls():
    from aiosmtpd.controller import Controller

    from tests.fakes.smtp import self_signed_context

    fake = SmtpFake()
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(fake, hostname="127.0.0.1", port=port, ssl_context=self_signed_context())
    controller.start()
    try:
        [ok] = send(smtp(port, security="tls", validate_certs=False), message())
        assert ok.outcome == "sent" and len(fake.received) == 1
        [plain] = send(smtp(port, security="none", timeout_seconds=2), message())
        assert plain.outcome == "retry" and len(fake.received) == 1
    finally:
        controller.stop()


def test_an_8bit_body_is_declared_8bitmime(server):
    m = message(text="Tirada ñ el domingo 🏃")
    [result] = send(smtp(server.port), m)
    assert result.outcome == "sent"
    [got] = server.received
    assert "BODY=8BITMIME" in [o.upper() for o in got.mail_options]
    assert got.message.get_body(("plain",)).get_content().strip() == "Tirada ñ el domingo 🏃"


def test_the_7bit_copy_is_quoted_printable_and_ascii():
    from providers.smtp import build_wire

    built = build_wire(message(text="Tirada ñ"), {"from_address": "club@runflow.example"}, None)
    assert not built.data.isascii() and built.seven_bit is not None and built.seven_bit.isascii()
    assert b"quoted-printable" in built.seven_bit.lower()


def test_one_click_unsubscribe_only_next_to_an_https_link(server):
    provider = smtp(server.port, ctx(public_url="http://notify.example", unsubscribe_secret="u-secret"))
    send(provider, message(category="newsletter"))
    [got] = server.received
    assert got.message["List-Unsubscribe"].startswith("<http://") and got.message["List-Unsubscribe-Post"] is None


@pytest.mark.parametrize(
    ("script", "outcome", "not_sent"),
    [
        ("", "sent", False),
        ("rcpt:451 4.3.0 Try later", "retry", True),  # refused before DATA: nothing accepted
        ("rcpt:550 5.1.1 No such user", "bounced", False),  # the address's outcome, not the relay's
        ("data:451 4.3.0 Try later", "retry", False),  # during DATA: never "not sent"
        ("data:554 5.7.1 Rejected", "failed", False),
    ],
)
def test_only_what_the_relay_refused_before_data_is_not_sent(server, script, outcome, not_sent):
    """providers/base.py SendResult.not_sent: set only where nothing can have been accepted (provider failover)."""
    if script:
        server.scripts["ana@example.com"] = script
    [result] = send(smtp(server.port), message())
    assert (result.outcome, result.not_sent) == (outcome, not_sent)


def test_a_refused_connection_is_not_sent():
    from tests.conftest import free_port

    [result] = send(smtp(free_port()), message())
    assert (result.outcome, result.error_code, result.not_sent) == ("retry", "smtp_unavailable", True)
