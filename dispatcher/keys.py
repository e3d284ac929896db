"""API keys: generated here, shown once, stored in Postgres only as SHA-256."""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "nd_"


def generate() -> str:
    """A new key: 'nd_' + 8 lookup characters + '_' + 32 bytes of randomness (url-safe base64)."""
    return f"{PREFIX}{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"


def display_prefix(key: str) -> str:
    """The part of a key that is safe to show and log (identifies it, cannot authenticate)."""
    return key[: len(PREFIX) + 8]


def digest(key: str) -> bytes:
    """SHA-256 of the key; what the database stores and looks up."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
