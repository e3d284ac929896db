"""Standard Webhooks v1 (HMAC-SHA256) signing and verification over the raw body.

Spec: webhook-id, webhook-timestamp, webhook-signature = space-separated "v1,<base64>" entries;
signed content "{id}.{timestamp}.{body}"; secret "whsec_" + base64. About forty lines, so kept in-house;
tests check it against the reference `standardwebhooks` package.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from providers.base import ConfigurationError, WebhookRejected

PREFIX = "whsec_"


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    """The key, read exactly as the reference library reads it (standardwebhooks.Webhook): the whsec_ prefix
    removed, then base64 with padding added (so an unpadded secret works); an empty key is refused."""
    key = base64.b64decode(secret.removeprefix(PREFIX) + "==")
    if not key:
        raise ConfigurationError("a Standard Webhooks secret is empty after its whsec_ prefix")
    return key


def check_secret(secret: str, setting: str) -> None:
    """At start-up: a secret that cannot sign or verify is a configuration error naming its setting."""
    try:
        _key(secret)
    except ConfigurationError:
        raise ConfigurationError(f"{setting}: the secret is empty after its whsec_ prefix") from None
    except ValueError:
        raise ConfigurationError(f"{setting}: the secret is not base64 after its whsec_ prefix") from None


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    content = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), content, hashlib.sha256).digest()).decode()


def headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(secret, msg_id, ts, body)}


def verify(secrets_: list[str], hdrs: dict[str, str], body: bytes, tolerance_seconds: int = 300) -> str:
    """Returns the webhook-id if any v1 signature matches one of the secrets (rotation) within tolerance."""
    msg_id = hdrs.get("webhook-id", "")
    ts_raw = hdrs.get("webhook-timestamp", "")
    sig_header = hdrs.get("webhook-signature", "")
    if not msg_id or not ts_raw or not sig_header:
        raise WebhookRejected("missing webhook-id, webhook-timestamp or webhook-signature")
    if len(msg_id) > 200:
        raise WebhookRejected("webhook-id too long")
    try:
        ts = int(ts_raw)
    except ValueError:
        raise WebhookRejected("webhook-timestamp is not an integer") from None
    if abs(time.time() - ts) > tolerance_seconds:
        raise WebhookRejected("webhook-timestamp outside the tolerance")
    offered = [part.split(",", 1)[1].encode() for part in sig_header.split() if part.startswith("v1,")]
    for secret in secrets_:
        expected = sign(secret, msg_id, ts, body).split(",", 1)[1].encode()
        # compare_digest on every candidate: no early exit that times the match.
        if any(hmac.compare_digest(expected, candidate) for candidate in offered):
            return msg_id
    raise WebhookRejected("no valid signature")
