"""The Twilio provider against the Twilio fake over a real socket: send shapes, auth, each error class; the webhook
adapter's signature check (Twilio's documented vector, tampering, another token, a proxy-rewritten Host) and parsing;
the segment count, in Python and in SQL, on the same texts."""

from __future__ import annotations

import asyncio
import random
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import msgspec
import psycopg
import pytest

from dispatcher.settings import Settings
from providers.base import Message, ProviderContext, ProviderSettings, WebhookRejected, WebhookRequest, webhook_url
from providers.secrets import Grants
from providers.twilio import NAME, Twilio, TwilioWebhooks, callback_url, classify, signature, sms_parts
from tests.conftest import call
from tests.fakes.twilio import TwilioFake, sign

TENANT = uuid.uuid4()
LOCAL = Grants(env_prefix="TEST_", private_endpoints=True)  # the operator's grant for the fake on this machine
PUBLIC = "https://notify.example.com"
FROM = "+15005550006"


@pytest.fixture
def twilio() -> Iterator[TwilioFake]:
    fake = TwilioFake()
    fake.base_url = fake.start()  # type: ignore[attr-defined]
    yield fake
    fake.stop()


def context(db_url: str, public_url: str | None = PUBLIC) -> ProviderContext:
    async def take(key: str, rate: float, wanted: int) -> int:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            row = await (await conn.execute("select notify_api.take_tokens_v1(%s, %s, %s)", (key, rate, wanted))).fetchone()
            return int(row[0])  # type: ignore[index]

    async def no_mock(rows: list) -> None:
        raise AssertionError("not the mock")

    settings = ProviderSettings.of(Settings(database_url=db_url, public_url=public_url))
    return ProviderContext(take_tokens=take, record_mock=no_mock, settings=settings)


@pytest.fixture
def ctx(db_url: str) -> ProviderContext:
    return context(db_url)


def provider(fake: TwilioFake, ctx: ProviderContext, monkeypatch: pytest.MonkeyPatch, **settings: object) -> Twilio:
    monkeypatch.setenv("TEST_TW_TOKEN", fake.auth_token)
    monkeypatch.setenv("TEST_TW_KEY_SECRET", fake.api_key_secret)
    base = {"account_sid": fake.account_sid, "from_number": FROM, "base_url": fake.base_url, "timeout_seconds": 1}  # type: ignore[attr-defined]
    secrets = {"auth_token": "env:TEST_TW_TOKEN", "api_key_secret": "env:TEST_TW_KEY_SECRET"}
    return Twilio({**base, **settings}, secrets, ctx, LOCAL)


def message(to: str = "+34600111222", text: str = "Hi Ana: Long run") -> Message:
    return Message(tenant_id=TENANT, delivery_id=uuid.uuid4(), attempt=1, channel="sms", address=to, rendered={"text": text})


def send(p: Twilio, *messages: Message) -> list:
    async def run() -> list:
        try:
            return await p.send_many(list(messages))
        finally:
            await p.aclose()

    return asyncio.run(run())


# --- sending -------------------------------------------------------------------------------------------------------
def test_a_message_is_sent_form_encoded_with_our_correlation_in_the_status_callback(twilio, ctx, monkeypatch):
    m = message()
    [result] = send(provider(twilio, ctx, monkeypatch), m)
    assert result.outcome == "sent" and result.provider == NAME and result.provider_message_id.startswith("SM")
    assert result.pricing == {"encoding": "GSM-7", "segments": 1, "units": 16, "twilio_segments": 1}
    [req] = twilio.requests
    assert req["path"] == f"/2010-04-01/Accounts/{twilio.account_sid}/Messages.json"
    assert (req["user"], req["password"]) == (twilio.account_sid, twilio.auth_token)  # basic auth: account SID + token
    form = req["form"]
    assert form["To"] == "+34600111222" and form["From"] == FROM and form["Body"] == "Hi Ana: Long run"
    assert "MessagingServiceSid" not in form and "ValidityPeriod" not in form
    callback = urlsplit(form["StatusCallback"])
    assert f"{callback.scheme}://{callback.netloc}{callback.path}" == f"{PUBLIC}/public/webhooks/twilio"
    assert parse_qs(callback.query) == {"nd": [f"{TENANT}:{m.delivery_id}"]}


def test_an_api_key_and_a_messaging_service(twilio, ctx, monkeypatch):
    sid = "MG" + "a" * 32
    p = provider(twilio, ctx, monkeypatch, api_key_sid=twilio.api_key_sid, messaging_service_sid=sid, validity_period=600)
    [result] = send(p, message())
    assert result.outcome == "sent"
    [req] = twilio.requests
    assert (req["user"], req["password"]) == (twilio.api_key_sid, twilio.api_key_secret)
    assert req["form"]["MessagingServiceSid"] == sid and "From" not in req["form"] and req["form"]["ValidityPeriod"] == "600"


def test_segments_and_encoding_of_what_is_sent(twilio, ctx, monkeypatch):
    long_gsm, accented = "a" * 161, "¿Mañana a las 7? ¡Vamos! Carrera 10€ " + "x" * 130
    results = send(provider(twilio, ctx, monkeypatch), message(text=long_gsm), message(text="Café ☕"), message(text=accented))
    assert [r.pricing["encoding"] for r in results] == ["GSM-7", "UCS-2", "GSM-7"]
    assert [r.pricing["segments"] for r in results] == [2, 1, 2]
    assert results[2].pricing["units"] == len(accented) + 1  # € is an extension character: two septets


@pytest.mark.parametrize(
    ("script", "outcome", "error_code"),
    [
        ("error:21610", "suppressed", "twilio_21610"),  # replied STOP: suppressed, consent revoked by the database
        ("error:21211", "failed", "twilio_21211"),  # invalid To
        ("error:21614", "failed", "twilio_21614"),  # not a mobile number
        ("error:21408", "failed", "twilio_21408"),  # region not enabled
        ("error:20429", "retry", "twilio_20429"),  # too many requests
        ("error:14107", "retry", "twilio_14107"),  # send rate limit exceeded
        ("http503", "retry", "twilio_20503"),  # refused before a message was created
        ("http500", "unknown", "twilio_20500"),  # may have been created: never resent
        ("timeout", "unknown", "no_response"),  # the request left us, no answer
        ("reset", "unknown", "no_response"),  # reset after the request was written
    ],
)
def test_each_error_class(twilio, ctx, monkeypatch, script, outcome, error_code):
    twilio.scripts["+34600111222"] = [script]
    twilio.retry_after = "7"
    [result] = send(provider(twilio, ctx, monkeypatch), message())
    assert (result.outcome, result.error_code) == (outcome, error_code)
    if script in ("error:20429", "error:14107", "http503"):
        assert result.retry_after_seconds == 7.0  # Twilio's Retry-After
    assert len(twilio.requests) == 1


def test_wrong_credentials_keep_the_message_for_an_operator(twilio, ctx, monkeypatch):
    p = provider(twilio, ctx, monkeypatch)
    monkeypatch.setenv("TEST_TW_TOKEN", "not-the-token")
    [result] = send(p, message())
    assert (result.outcome, result.error_code, result.retry_after_seconds) == ("retry", "twilio_20003", 300.0)


def test_a_refused_connection_never_left_us_and_is_retried(ctx, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake = TwilioFake()
    fake.base_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    [result] = send(provider(fake, ctx, monkeypatch), message())
    assert (result.outcome, result.error_code) == ("retry", "connect_failed")


def test_without_a_public_url_nothing_is_sent(twilio, db_url, monkeypatch):
    [result] = send(provider(twilio, context(db_url, None), monkeypatch), message())
    assert (result.outcome, result.error_code) == ("retry", "public_url_missing") and twilio.requests == []


def test_a_secret_outside_the_grant_is_never_read_or_sent(twilio, ctx, monkeypatch):
    monkeypatch.setenv("OTHER_TW_TOKEN", twilio.auth_token)
    p = Twilio(
        {"account_sid": twilio.account_sid, "from_number": FROM, "base_url": twilio.base_url},  # type: ignore[attr-defined]
        {"auth_token": "env:OTHER_TW_TOKEN"},
        ctx,
        LOCAL,
    )
    [result] = send(p, message())
    assert (result.outcome, result.error_code) == ("retry", "secret_not_allowed") and twilio.requests == []


def test_classify_without_a_twilio_code():
    assert classify(None, "Too Many Requests", 429).outcome == "retry"
    assert classify(None, "Bad Gateway", 502).outcome == "unknown"
    assert classify(None, "Bad Request", 400).outcome == "failed"


# --- webhooks ------------------------------------------------------------------------------------------------------
def test_the_signature_is_twilios(monkeypatch):
    # Twilio's documented example (twilio-python's request validator tests, docs "Webhooks security").
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+12349013030",
        "Digits": "1234",
        "From": "+12349013030",
        "To": "+18005551212",
    }
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert signature("12345", url, list(params.items())) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    assert sign("12345", url, params) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="  # the fake's own implementation agrees


TOKEN = "tenant-auth-token"
ACCOUNT = "AC" + "1" * 32


def keys(tenant: uuid.UUID = TENANT) -> list[dict]:
    return [{"tenant_id": str(tenant), "secrets": {"auth_token": "env:TEST_HOOK_TOKEN"}, "grants": {"env_prefix": "TEST_"}}]


def status_request(status: str = "delivered", code: str | None = None, delivery: uuid.UUID | None = None) -> tuple[str, dict]:
    query = urlencode({"nd": f"{TENANT}:{delivery or uuid.uuid4()}"})
    params = {"AccountSid": ACCOUNT, "MessageSid": "SM" + "f" * 32, "MessageStatus": status, "From": FROM, "To": "+34600111222"}
    if code:
        params["ErrorCode"] = code
    return query, params


def request(
    query: str, body: bytes, headers: dict, keys_: list[dict] | None = None, public: str | None = PUBLIC
) -> WebhookRequest:
    """The request as the route hands it over: the URL from the configured public URL and the query string as received."""
    url = webhook_url(public, "twilio", query) if public else None
    return WebhookRequest(headers=headers, body=body, query=query, url=url, keys=tuple(keys_ or ()))


def deliver(adapter: TwilioWebhooks, query: str, params: dict, signed_url: str | None = None, token: str = TOKEN, **headers: str):
    body = urlencode(params).encode()
    url = signed_url or callback_url(PUBLIC) + f"?{query}"
    h = {"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": sign(token, url, params), **headers}
    hints = adapter.key_hints(request(query, body, h))
    return hints, adapter.parse(request(query, body, h, keys()))


def test_a_status_callback_is_verified_over_the_public_url_not_the_host(monkeypatch):
    monkeypatch.setenv("TEST_HOOK_TOKEN", TOKEN)
    adapter = TwilioWebhooks()
    delivery = uuid.uuid4()
    query, params = status_request("delivered", delivery=delivery)
    # Behind a proxy: Host names the API's own address, the signature is over the URL Twilio requested.
    hints, parsed = deliver(adapter, query, params, host="127.0.0.1:8000", **{"x-forwarded-host": "evil.example"})
    assert hints == {"account_sid": ACCOUNT, "tenant_id": str(TENANT), "number": FROM, "messaging_service_sid": None}
    [event] = parsed.events
    # Found by the tenant and delivery the signed URL names, never by the sid (which the database looks up across tenants).
    assert (event.status, event.tenant_id, event.delivery_id, event.provider_message_id) == ("delivered", TENANT, delivery, None)
    assert parsed.event_key == f"{params['MessageSid']}:delivered"
    # The same request signed over the URL the Host header would give is refused.
    with pytest.raises(WebhookRejected):
        deliver(adapter, query, params, signed_url=f"http://127.0.0.1:8000/public/webhooks/twilio?{query}")
    # The default port written out is the same URL (Twilio's SDKs accept both).
    deliver(adapter, query, params, signed_url=f"https://notify.example.com:443/public/webhooks/twilio?{query}")


@pytest.mark.parametrize("attack", ["tampered", "other_token", "no_header", "other_query", "replayed"])
def test_a_forged_signature_is_refused(monkeypatch, attack):
    monkeypatch.setenv("TEST_HOOK_TOKEN", TOKEN)
    adapter = TwilioWebhooks()
    query, params = status_request("sent")
    url = callback_url(PUBLIC) + f"?{query}"
    good = sign(TOKEN, url, params)
    headers = {"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": good}
    body = urlencode(params).encode()
    if attack == "tampered":
        body = urlencode({**params, "MessageStatus": "delivered"}).encode()
    elif attack == "other_token":
        headers["x-twilio-signature"] = sign("another-tenants-token", url, params)
    elif attack == "no_header":
        del headers["x-twilio-signature"]
    elif attack == "other_query":
        query = urlencode({"nd": f"{TENANT}:{uuid.uuid4()}"})  # the signature of one delivery's callback on another's
    elif attack == "replayed":
        _, other = status_request("undelivered", code="30003")
        body = urlencode({**other, "MessageSid": params["MessageSid"]}).encode()  # a captured signature, new parameters
    with pytest.raises(WebhookRejected) as caught:
        adapter.key_hints(request(query, body, headers))
        adapter.parse(request(query, body, headers, keys()))
    assert caught.value.status == 401


def test_statuses_by_rank_and_error_codes(monkeypatch):
    monkeypatch.setenv("TEST_HOOK_TOKEN", TOKEN)
    adapter = TwilioWebhooks()
    for status, code, expected, error in [
        ("queued", None, "sending", None),
        ("sent", None, "sent", None),
        ("undelivered", "30003", "failed", "twilio_30003"),
        ("failed", "30007", "failed", "twilio_30007"),
        ("failed", "21610", "suppressed", "twilio_21610"),
        ("read", None, "read", None),
    ]:
        query, params = status_request(status, code)
        [event] = deliver(adapter, query, params)[1].events
        assert (event.status, event.error_code) == (expected, error)
        if code == "30003":
            assert event.error_message == "Unreachable destination handset"
    query, params = status_request("canceled")
    assert deliver(adapter, query, params)[1].events == []


def test_a_callback_naming_another_tenant_than_its_key_applies_nothing(monkeypatch):
    monkeypatch.setenv("TEST_HOOK_TOKEN", TOKEN)
    adapter = TwilioWebhooks()
    query, params = status_request("delivered")
    body = urlencode(params).encode()
    url = callback_url(PUBLIC) + f"?{query}"
    headers = {"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": sign(TOKEN, url, params)}
    parsed = adapter.parse(request(query, body, headers, keys(uuid.uuid4())))  # the key's tenant is not the URL's
    assert parsed.events == [] and parsed.notes


def test_an_inbound_message(monkeypatch):
    monkeypatch.setenv("TEST_HOOK_TOKEN", TOKEN)
    adapter = TwilioWebhooks()
    params = {"AccountSid": ACCOUNT, "MessageSid": "SM" + "e" * 32, "SmsStatus": "received", "From": "+34600111222", "To": FROM}
    params["Body"] = "Stop"
    hints, parsed = deliver(adapter, "", params, signed_url=callback_url(PUBLIC))
    assert hints == {"account_sid": ACCOUNT, "tenant_id": None, "number": FROM, "messaging_service_sid": None}
    [m] = parsed.inbound
    assert (m.to, m.sender, m.message_id, m.text) == (FROM, "+34600111222", params["MessageSid"], "Stop")
    assert m.messaging_service_sid is None


def test_an_inbound_message_to_a_number_of_a_messaging_service(monkeypatch):
    """A reply to a number of a Messaging Service's pool names the service: a key hint, and kept with the message."""
    monkeypatch.setenv("TEST_HOOK_TOKEN", TOKEN)
    service = "MG" + "4" * 32
    params = {"AccountSid": ACCOUNT, "MessageSid": "SM" + "f" * 32, "SmsStatus": "received", "From": "+34600111222"}
    params |= {"To": "+15005550010", "Body": "STOP", "MessagingServiceSid": service}
    hints, parsed = deliver(TwilioWebhooks(), "", params, signed_url=callback_url(PUBLIC))
    assert hints == {"account_sid": ACCOUNT, "tenant_id": None, "number": "+15005550010", "messaging_service_sid": service}
    [m] = parsed.inbound
    assert (m.to, m.messaging_service_sid) == ("+15005550010", service)
    assert msgspec.to_builtins(m)["messaging_service_sid"] == service
    assert parsed.event_key == f"inbound:{params['MessageSid']}" and parsed.events == []


def test_without_a_public_url_twilio_webhooks_are_not_served():
    with pytest.raises(WebhookRejected) as caught:
        TwilioWebhooks().key_hints(request("", b"", {"x-twilio-signature": "x"}, public=None))
    assert caught.value.status == 404
    with pytest.raises(WebhookRejected) as caught:
        TwilioWebhooks().parse(request("", b"", {"x-twilio-signature": "x"}, keys(), public=None))
    assert caught.value.status == 404


# --- segments: the worker's count and the database's agree ---------------------------------------------------------
def test_python_and_sql_count_segments_alike(db):
    rng = random.Random(16)
    alphabet = "abcXYZ 019@£$¥èéΔ_ΦÆæß!?¿¡§{}[]~^|€\\\f'\"\n\r¤%&" + "ñÑüÜ" + "çÇáóú☕😀中\x1b\t"
    texts = ["", "a" * 160, "a" * 161, "a" * 306, "a" * 307, "€" * 80, "€" * 81, "a" * 152 + "€" + "a" * 152, "ç" * 70, "ç" * 71]
    texts += ["😀" * 35, "😀" * 36, "a" * 66 + "😀" + "a" * 10]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400))) for _ in range(200)]
    texts += ["".join(rng.choice(alphabet[:46]) for _ in range(rng.randint(140, 480))) for _ in range(100)]
    sql = db.execute("select notify._sms_parts(t) from unnest(%s::text[]) t", (texts,)).fetchall()
    for t, (parts,) in zip(texts, sql, strict=True):
        assert parts == sms_parts(t), t
    # 306 septets would fill two segments, but the escape pair is not split: 152, then € and 151, then 1.
    assert sms_parts("a" * 152 + "€" + "a" * 152) == {"encoding": "GSM-7", "segments": 3, "units": 306}
    assert call(db, "notify._sms_parts('a' || repeat('😀', 35))") == {"encoding": "UCS-2", "segments": 2, "units": 71}


@pytest.mark.parametrize(
    ("code", "http_status", "not_sent"),
    [
        (20003, 401, True),  # credentials refused
        (20429, 429, True),  # throttled: refused as too many
        (20503, 503, True),  # service unavailable before creating a message
        (None, 500, False),  # any other 5xx: the message may exist
        (21211, 400, False),  # the message's own failure, not the account's
        (21610, 400, False),
    ],
)
def test_only_refusals_before_a_message_exists_are_not_sent(code, http_status, not_sent):
    """providers/base.py SendResult.not_sent: what a failover chain may move to the next account."""
    assert classify(code, "x", http_status).not_sent is not_sent
