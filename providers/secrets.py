"""Secret references: "env:NAME" or "file:/path". The database holds only references; values are read here,
at send time, and never logged or stored.

A reference is read only if it lies inside the tenant's grant (notify.provider_grants, set by the operator and
handed over with every claim): env:NAME with the granted prefix, file:/path below the granted directory once every
symlink and `..` is resolved. The database refuses other references when they are saved; this is the second check,
for rows an older version saved and for a grant the operator has since narrowed. The same grant says whether the
tenant's endpoints may be private hosts (`endpoint`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatcher.callback_urls import UnsafeUrl, check_syntax, resolve_host


class SecretMissing(Exception):
    """A reference points at nothing: the delivery is retried (an operator can fix it) and the log names the reference."""

    code = "secret_missing"


class SecretNotAllowed(SecretMissing):
    """A reference outside the tenant's grant: never read, retried like a missing secret until the operator fixes it."""

    code = "secret_not_allowed"


@dataclass(frozen=True)
class Grants:
    """What the operator lets one tenant's providers use. No grant: no secrets, public endpoints only."""

    env_prefix: str | None = None
    file_dir: str | None = None
    private_endpoints: bool = False

    @classmethod
    def of(cls, raw: Mapping[str, Any] | None) -> Grants:
        raw = raw or {}
        return cls(
            env_prefix=raw.get("env_prefix") or None,
            file_dir=raw.get("file_dir") or None,
            private_endpoints=bool(raw.get("private_endpoints")),
        )


def _inside(path: str, directory: str) -> Path | None:
    """The file a reference names, if it lies below the directory after resolving symlinks and `..`; else None."""
    if ".." in Path(path).parts or not path.startswith(directory):
        return None
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(directory))
    return real if real != root and real.is_relative_to(root) else None


def resolve(ref: str | None, grants: Grants | None = None) -> str | None:
    if ref is None:
        return None
    grants = grants or Grants()
    kind, _, where = ref.partition(":")
    if kind == "env":
        if not grants.env_prefix or not where.startswith(grants.env_prefix) or where == grants.env_prefix:
            raise SecretNotAllowed(f"environment variable {where} is outside the tenant's secret namespace")
        value = os.environ.get(where)
        if value is None:
            raise SecretMissing(f"environment variable {where} is not set")
        return value
    if kind == "file":
        real = _inside(where, grants.file_dir) if grants.file_dir else None
        if real is None:
            raise SecretNotAllowed(f"file {where} is outside the tenant's secret namespace")
        try:
            return real.read_text().strip()
        except OSError as exc:
            raise SecretMissing(f"cannot read {where}: {exc.strerror}") from None
    raise SecretMissing(f"not a secret reference: {kind}:…")


async def endpoint(url: str, grants: Grants | None) -> tuple[str, str, int]:
    """Checks a provider endpoint URL at send time, DNS included (the answer may have changed since it was saved), with
    the callback URLs' check (dispatcher/callback_urls.py): https and public addresses only, unless the operator granted
    private endpoints. Returns (scheme, checked address, port) to connect to. Raises UnsafeUrl."""
    allow = bool(grants and grants.private_endpoints)
    try:
        scheme, host, port = check_syntax(url, allow_private=allow)
        return scheme, await resolve_host(host, port, allow_private=allow, what="provider endpoint"), port
    except UnsafeUrl as exc:
        raise UnsafeUrl(str(exc).replace("callback URL", "provider endpoint")) from None
    except ValueError:  # urlsplit: e.g. an unbalanced [
        raise UnsafeUrl("provider endpoint is not a valid URL") from None


@dataclass(frozen=True)
class Endpoint:
    """Which of a tenant's settings names the host the worker connects to, checked (DNS included) when it is saved
    (providers.secrets.check_endpoints) and at every send. `url`: an https URL (base_url); else a host name with its
    port in `port_field` (SMTP)."""

    field: str
    url: bool = True
    port_field: str | None = None
    default_port: int | None = None


async def check_endpoints(spec: Endpoint | None, settings: Mapping[str, Any] | None, grants: Grants) -> tuple[str, str] | None:
    """Save-time DNS check of the endpoint a tenant sets (the database checks its syntax, but cannot resolve a name), as
    its provider kind declares it (ProviderKind.endpoint): (field, reason) if it is refused, None if it passes, the kind
    has none, or the operator granted private endpoints. The worker checks again at every send."""
    if spec is None or grants.private_endpoints or not isinstance(settings, Mapping):
        return None
    value = settings.get(spec.field)
    if not isinstance(value, str):
        return None
    try:
        if spec.url:
            await endpoint(value, grants)
        else:
            port = settings.get(spec.port_field) if spec.port_field else None
            port = port if isinstance(port, int) else spec.default_port or 443
            await resolve_host(value.strip("[]"), port, allow_private=False, what="provider endpoint")
    except UnsafeUrl as exc:
        if "not a valid URL" in str(exc):
            return None  # malformed: the database names the field (400 invalid_format)
        return f"settings.{spec.field}", str(exc)
    except ValueError:  # a host getaddrinfo cannot even encode: the database judges its syntax
        return None
    return None
