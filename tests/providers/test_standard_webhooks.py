"""Our Standard Webhooks verifier against the reference `standardwebhooks` package, and forgeries."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from standardwebhooks.webhooks import Webhook

from providers import standard_webhooks as sw
from providers.base import WebhookRejected, WebhookRequest
from providers.mock import MockWebhooks

BODY = json.dumps(
    {
        "type": "message.status.delivered",
        "timestamp": "2026-11-26T10:00:00Z",
        "data": {"message_id": "mock-1", "correlation_id": None, "status": "delivered"},
    }
).encode()


def test_our_signature_verifies_with_the_reference_library():
    secret = sw.new_secret()
    headers = sw.headers(secret, "msg_1", BODY)
    Webhook(secret).verify(BODY, headers)


def test_the_reference_librarys_signature_verifies_with_ours():
    secret = sw.new_secret()
    now = int(time.time())
    signature = Webhook(secret).sign("msg_2", dt.datetime.fromtimestamp(now, dt.UTC), BODY.decode())
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(now), "webhook-signature": signature}
    assert sw.verify([secret], headers, BODY) == "msg_2"


def test_any_of_several_signatures_and_secrets_is_accepted_for_rotation():
    old, new = sw.new_secret(), sw.new_secret()
    headers = sw.headers(new, "msg_3", BODY)
    headers["webhook-signature"] = "v1,AAAA " + headers["webhook-signature"]
    assert sw.verify([old, new], headers, BODY) == "msg_3"


@pytest.mark.parametrize(
    "tamper",
    [
        "forged",
        "truncated_body",
        "wrong_secret",
        "reserialized",
        "stale",
        "future",
        "no_signature",
        "no_id",
        "bad_timestamp",
        "other_id",
    ],
)
def test_forgeries_are_rejected(tamper):
    secret = sw.new_secret()
    body, headers = BODY, sw.headers(secret, "msg_4", BODY)
    if tamper == "forged":
        headers["webhook-signature"] = "v1," + "A" * 44
    elif tamper == "truncated_body":
        body = BODY[:-5]
    elif tamper == "wrong_secret":
        headers = sw.headers(sw.new_secret(), "msg_4", BODY)
    elif tamper == "reserialized":
        body = json.dumps(json.loads(BODY), indent=2).encode()
    elif tamper == "stale":
        headers = sw.headers(secret, "msg_4", BODY, timestamp=int(time.time()) - 301)
    elif tamper == "future":
        headers = sw.headers(secret, "msg_4", BODY, timestamp=int(time.time()) + 301)
    elif tamper == "no_signature":
        del headers["webhook-signature"]
    elif tamper == "no_id":
        del headers["webhook-id"]
    elif tamper == "bad_timestamp":
        headers["webhook-timestamp"] = "yesterday"
    elif tamper == "other_id":
        headers["webhook-id"] = "msg_5"
    with pytest.raises(WebhookRejected):
        sw.verify([secret], headers, body)


def test_mock_adapter_normalizes_a_report():
    secret = sw.new_secret()
    body = json.dumps(
        {
            "type": "message.status.failed",
            "timestamp": "2026-11-26T10:00:00Z",
            "data": {
                "message_id": "mock-9",
                "status": "failed",
                "correlation_id": "7b2c3f1e-0000-4000-8000-000000000001:7b2c3f1e-0000-4000-8000-000000000002",
                "error": {"code": "x", "title": "y"},
            },
        }
    ).encode()
    parsed = MockWebhooks([secret]).parse(WebhookRequest(sw.headers(secret, "msg_6", body), body))
    event = parsed.events[0]
    assert parsed.event_key == "msg_6" and event.status == "failed" and event.provider_message_id == "mock-9"
    assert str(event.delivery_id).endswith("0002") and (event.error_code, event.error_message) == ("x", "y")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"type": "x"}',
        b'{"type":"x","timestamp":"2026-11-26T10:00:00Z","data":{"message_id":"m","status":"exploded"}}',
    ],
)
def test_mock_adapter_keeps_verified_malformed_payloads_with_a_reason(body):
    # A verified payload is never refused (the sender would retry): stored, nothing applied, a reason kept.
    secret = sw.new_secret()
    parsed = MockWebhooks([secret]).parse(WebhookRequest(sw.headers(secret, "msg_7", body), body))
    assert parsed.event_key == "msg_7" and parsed.events == [] and parsed.notes


def test_mock_adapter_without_a_secret_refuses_everything():
    with pytest.raises(WebhookRejected) as info:
        MockWebhooks([]).parse(WebhookRequest({}, BODY))
    assert info.value.status == 404
