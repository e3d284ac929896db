"""One-click unsubscribe tokens (RFC 8058): "<tenant>.<delivery>.<hmac>", signed with DISPATCHER_UNSUBSCRIBE_SECRET.
Made by the e-mail provider in runner/, checked by the public route in api/."""

from __future__ import annotations

import base64
import hashlib
import hmac
from uuid import UUID


def _sig(secret: str, tenant_id: UUID, delivery_id: UUID) -> str:
    mac = hmac.new(secret.encode(), f"{tenant_id}.{delivery_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:18]).decode()


def make_token(secret: str, tenant_id: UUID, delivery_id: UUID) -> str:
    return f"{tenant_id}.{delivery_id}.{_sig(secret, tenant_id, delivery_id)}"


def check_token(secret: str, token: str) -> tuple[UUID, UUID] | None:
    """(tenant_id, delivery_id) if the token is ours, else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        tenant_id, delivery_id = UUID(parts[0]), UUID(parts[1])
    except ValueError:
        return None
    if not hmac.compare_digest(_sig(secret, tenant_id, delivery_id), parts[2]):
        return None
    return tenant_id, delivery_id
