"""Settings from the environment (DISPATCHER_*, DATABASE_URL); secrets from the environment or mounted files.

Every setting is declared once, below, as one field of `Settings`: its attribute name, type and default, and in its
`Env(...)` the environment variable, who reads it (`Group`) and one line of documentation. `Settings.from_env()`
builds the whole struct from those declarations; `read(name)` reads one setting the same way where a process needs it
before it has a database URL (the CLI's own options, the worker's import-time procrastinate options).
README.md's configuration table documents exactly these variables (tests/test_settings.py checks both ways).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec


def secret(name: str, default: str | None = None) -> str | None:
    """A secret from NAME, or from the file named by NAME_FILE (Secret Manager or Kubernetes mounts)."""
    value = os.environ.get(name)
    if value:
        return value
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return default


class Group(enum.StrEnum):
    """Who reads a setting."""

    COMMON = "common"  # every process: the database, the logs
    API = "api"  # `dispatcher serve`
    WORKER = "worker"  # `dispatcher worker` / `procrastinate --app=runner.app.app worker`
    PROVIDERS = "providers"  # channel providers and webhook adapters (providers.base.ProviderSettings), the mock
    DEV = "dev"  # `dispatcher dev`, the CLI's dev database, benchmarks


_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


@dataclasses.dataclass(frozen=True)
class Env:
    """Where a setting comes from: `name` (empty values count as unset), who reads it, what it means.

    `secret`: NAME_FILE names a file holding the value (mounted secrets). `fallback`: a second variable, read as a
    secret, when NAME is unset. `parse`: turns the text into the value, where the field's type alone does not say how.
    """

    name: str
    group: Group
    doc: str
    secret: bool = False
    fallback: str | None = None
    parse: Callable[[str], Any] | None = None


def _port_or_none(raw: str) -> int | None:
    return int(raw) or None  # 0: not served


def _words(raw: str) -> list[str]:
    return raw.split()  # several values, space-separated (secrets while rotating)


def _json_object(raw: str) -> dict[str, str]:
    return msgspec.json.decode(raw, type=dict[str, str])


A, W, P, D, C = Group.API, Group.WORKER, Group.PROVIDERS, Group.DEV, Group.COMMON


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Everything the API, the worker, the providers and the CLI read from the environment (one field per variable)."""

    # common
    database_url: Annotated[str, Env("DATABASE_URL", C, "libpq URL of the database", fallback="DISPATCHER_DATABASE_URL")]
    log_level: Annotated[str, Env("DISPATCHER_LOG_LEVEL", C, "level of the JSON logs on stderr")] = "INFO"
    # API
    host: Annotated[str, Env("DISPATCHER_HOST", A, "address `serve` listens on")] = "127.0.0.1"
    port: Annotated[int, Env("DISPATCHER_PORT", A, "port `serve` (and `dev`) listens on")] = 8000
    api_workers: Annotated[int, Env("DISPATCHER_API_WORKERS", A, "uvicorn worker processes of `serve`")] = 1
    max_body_bytes: Annotated[int, Env("DISPATCHER_MAX_BODY_BYTES", A, "request body limit")] = 256 * 1024
    # A fan-out (up to 10,000 recipients) or a batch (up to 1,000 intents) may be this large.
    max_bulk_body_bytes: Annotated[int, Env("DISPATCHER_MAX_BULK_BODY_BYTES", A, "body limit of a fan-out or a batch")] = (
        16 * 1024 * 1024
    )
    # The API's Prometheus /metrics: on its own listener (the operator's), never on the public one. No port: not served.
    metrics_port: Annotated[
        int | None, Env("DISPATCHER_METRICS_PORT", A, "port of the API's /metrics listener", parse=_port_or_none)
    ] = None
    metrics_host: Annotated[str, Env("DISPATCHER_METRICS_HOST", A, "address of the API's /metrics listener")] = "127.0.0.1"
    pool_min: Annotated[int, Env("DISPATCHER_POOL_MIN", A, "API connection pool, smallest")] = 2
    pool_max: Annotated[int, Env("DISPATCHER_POOL_MAX", A, "API connection pool, largest")] = 10
    # worker
    batch_size: Annotated[int, Env("DISPATCHER_BATCH_SIZE", W, "deliveries claimed per batch")] = 100
    max_in_flight: Annotated[int, Env("DISPATCHER_MAX_IN_FLIGHT", W, "provider calls in flight per dispatch job")] = 100
    lease_seconds: Annotated[int, Env("DISPATCHER_LEASE_SECONDS", W, "how long a claim may take")] = 60
    dispatch_linger_ms: Annotated[float, Env("DISPATCHER_DISPATCH_LINGER_MS", W, "how long a drain waits for new work")] = 250.0
    callback_batch_size: Annotated[int, Env("DISPATCHER_CALLBACK_BATCH_SIZE", W, "status callbacks posted at once")] = 50
    log_deliveries: Annotated[bool, Env("DISPATCHER_LOG_DELIVERIES", W, "one log line per delivery attempt")] = True
    worker_concurrency: Annotated[int, Env("DISPATCHER_WORKER_CONCURRENCY", W, "procrastinate jobs at once per process")] = 4
    worker_pool_max: Annotated[int, Env("DISPATCHER_WORKER_POOL_MAX", W, "the worker's connection pool, largest")] = 20
    # provider failover (docs/operations.md, "Provider failover"): N "not sent" errors within M seconds demote a
    # chained provider for D seconds (tried after the healthy ones of its chain); a success ends it
    failover_demote_errors: Annotated[
        int, Env("DISPATCHER_FAILOVER_DEMOTE_ERRORS", W, '"not sent" errors that demote a chained provider (N)')
    ] = 5
    failover_window_seconds: Annotated[
        float, Env("DISPATCHER_FAILOVER_WINDOW_SECONDS", W, "the window those errors are counted in (M)")
    ] = 60.0
    failover_demote_seconds: Annotated[float, Env("DISPATCHER_FAILOVER_DEMOTE_SECONDS", W, "how long a demotion lasts (D)")] = (
        300.0
    )
    worker_metrics_port: Annotated[
        int | None, Env("DISPATCHER_WORKER_METRICS_PORT", W, "port of the worker's metrics listener", parse=_port_or_none)
    ] = None
    worker_metrics_host: Annotated[str, Env("DISPATCHER_WORKER_METRICS_HOST", W, "address of the worker's metrics listener")] = (
        "127.0.0.1"
    )
    maintenance_cron: Annotated[str, Env("DISPATCHER_MAINTENANCE_CRON", W, "when maintenance runs (cron, seconds last)")] = (
        "* * * * * */10"
    )
    retention_cron: Annotated[str, Env("DISPATCHER_RETENTION_CRON", W, "when the retention task runs (cron, seconds last)")] = (
        "*/10 * * * * 0"
    )
    job_retention_hours: Annotated[
        int, Env("DISPATCHER_JOB_RETENTION_HOURS", W, "hours a finished procrastinate job is kept")
    ] = 24
    # rendering (tenant templates are untrusted: docs/security.md, "Templates and the shared worker")
    render_processes: Annotated[int, Env("DISPATCHER_RENDER_PROCESSES", W, "render child processes")] = 2
    render_timeout_ms: Annotated[float, Env("DISPATCHER_RENDER_TIMEOUT_MS", W, "time budget of one render")] = 500.0
    render_memory_mb: Annotated[int, Env("DISPATCHER_RENDER_MEMORY_MB", W, "address-space limit of a render process")] = 256
    render_max_chars: Annotated[int, Env("DISPATCHER_RENDER_MAX_CHARS", W, "largest rendered text body")] = 64 * 1024
    render_max_html_chars: Annotated[int, Env("DISPATCHER_RENDER_MAX_HTML_CHARS", W, "largest rendered HTML body")] = 256 * 1024
    render_max_subject_chars: Annotated[int, Env("DISPATCHER_RENDER_MAX_SUBJECT_CHARS", W, "largest rendered subject")] = 1024
    # providers: the mock
    mock_webhook_secret: Annotated[
        str | None, Env("DISPATCHER_MOCK_WEBHOOK_SECRET", P, "whsec_ secret(s) of the mock's reports", secret=True)
    ] = None
    # from_env: http://127.0.0.1:$DISPATCHER_PORT/public/webhooks/mock when unset
    mock_webhook_url: Annotated[str | None, Env("DISPATCHER_MOCK_WEBHOOK_URL", P, "where the mock posts status reports")] = None
    mock_latency_ms: Annotated[float, Env("DISPATCHER_MOCK_LATENCY_MS", P, "the mock's send latency")] = 0.0
    mock_failure_rate: Annotated[float, Env("DISPATCHER_MOCK_FAILURE_RATE", P, "share of transient mock failures")] = 0.0
    mock_status_delay_ms: Annotated[float, Env("DISPATCHER_MOCK_STATUS_DELAY_MS", P, "delay between mock status reports")] = 200.0
    mock_outcomes: Annotated[
        dict[str, str], Env("DISPATCHER_MOCK_OUTCOMES", P, "scripted mock outcomes by address (JSON)", parse=_json_object)
    ] = {}
    mock_record: Annotated[
        bool, Env("DISPATCHER_MOCK_RECORD", P, "the mock records what it sent (GET /internal/mock/messages)")
    ] = True
    # providers: real ones, deployment-wide webhook secrets (a Meta app, an ESP account serve every tenant)
    webhook_tolerance_seconds: Annotated[int, Env("DISPATCHER_WEBHOOK_TOLERANCE_SECONDS", P, "accepted webhook clock skew")] = 300
    whatsapp_app_secrets: Annotated[
        list[str], Env("DISPATCHER_WHATSAPP_APP_SECRET", P, "Meta app secret(s)", secret=True, parse=_words)
    ] = []
    whatsapp_verify_token: Annotated[
        str | None, Env("DISPATCHER_WHATSAPP_VERIFY_TOKEN", P, "the WhatsApp webhook verify token", secret=True)
    ] = None
    sendgrid_verification_key: Annotated[
        str | None, Env("DISPATCHER_SENDGRID_VERIFICATION_KEY", P, "SendGrid webhook key", secret=True)
    ] = None
    mailgun_signing_key: Annotated[str | None, Env("DISPATCHER_MAILGUN_SIGNING_KEY", P, "Mailgun webhook key", secret=True)] = (
        None
    )
    # The API's public base URL: of /public/unsubscribe links, of Twilio's StatusCallback (and so the URL Twilio signs and
    # its webhooks are verified over). Required for SMS: without it a Twilio send is refused (public_url_missing, nothing
    # sent) and /public/webhooks/twilio answers 404.
    public_url: Annotated[
        str | None,
        Env("DISPATCHER_PUBLIC_URL", P, "public base URL: unsubscribe links, Twilio's StatusCallback and signature (SMS)"),
    ] = None
    unsubscribe_secret: Annotated[str | None, Env("DISPATCHER_UNSUBSCRIBE_SECRET", P, "signs unsubscribe links", secret=True)] = (
        None
    )
    # development
    # Callback URLs may be http and private/loopback (a receiver on localhost).
    dev_mode: Annotated[bool, Env("DISPATCHER_DEV_MODE", D, "callback URLs may be http and private")] = False
    bench_baseline: Annotated[bool, Env("DISPATCHER_BENCH_BASELINE", D, "the API serves the benchmark's baseline route")] = False
    data_dir: Annotated[str, Env("DISPATCHER_DATA_DIR", D, "the dev stack's data folder")] = ".dispatcher"
    dev_api_key: Annotated[str | None, Env("DISPATCHER_DEV_API_KEY", D, "the dev tenant's API key")] = None

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        values: dict[str, object] = {name: read(name) for name in DECLARED if name not in overrides}
        if not values.get("database_url") and "database_url" not in overrides:
            raise SystemExit("DATABASE_URL is not set (dispatcher dev starts an embedded Postgres instead)")
        if values.get("mock_webhook_url") is None and "mock_webhook_url" not in overrides:
            port = overrides["port"] if "port" in overrides else values["port"]
            values["mock_webhook_url"] = f"http://127.0.0.1:{port}/public/webhooks/mock"
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Declared:
    """One setting as declared: attribute name, type, default (Settings' own), and where it comes from."""

    name: str
    type: Any
    default: Any
    env: Env


def _declared() -> dict[str, Declared]:
    hints = typing.get_type_hints(Settings, include_extras=True)
    out: dict[str, Declared] = {}
    for field in msgspec.structs.fields(Settings):
        hint = hints[field.name]
        env = next(m for m in hint.__metadata__ if isinstance(m, Env))
        default = (
            field.default
            if field.default is not msgspec.NODEFAULT
            else (field.default_factory() if field.default_factory is not msgspec.NODEFAULT else None)
        )
        out[field.name] = Declared(field.name, typing.get_args(hint)[0], default, env)
    return out


DECLARED: dict[str, Declared] = _declared()


def read(name: str) -> Any:
    """One setting from the environment, parsed as declared; its default when unset or empty."""
    d = DECLARED[name]
    raw = secret(d.env.name) if d.env.secret else os.environ.get(d.env.name)
    if not raw and d.env.fallback:
        raw = secret(d.env.fallback)
    if not raw:
        return copy.copy(d.default)  # a list or dict default is never shared between Settings
    if d.env.parse is not None:
        return d.env.parse(raw)
    if d.type is bool:
        return True if raw in _TRUE else False if raw in _FALSE else d.default
    if d.type in (int, float):
        return d.type(raw)
    return raw


def of_group(group: Group) -> list[Declared]:
    return [d for d in DECLARED.values() if d.env.group is group]
