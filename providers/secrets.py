"""Secret references: "env:NAME" or "file:/path". The database holds only references; values are read here,
at send time, and never logged or stored."""

from __future__ import annotations

import os
from pathlib import Path


class SecretMissing(Exception):
    """A reference points at nothing: the delivery is retried (an operator can fix it) and the log names the reference."""


def resolve(ref: str | None) -> str | None:
    if ref is None:
        return None
    kind, _, where = ref.partition(":")
    if kind == "env":
        value = os.environ.get(where)
        if value is None:
            raise SecretMissing(f"environment variable {where} is not set")
        return value
    if kind == "file":
        try:
            return Path(where).read_text().strip()
        except OSError as exc:
            raise SecretMissing(f"cannot read {where}: {exc.strerror}") from None
    raise SecretMissing(f"not a secret reference: {kind}:…")
