"""Settings from the environment (DISPATCHER_*, DATABASE_URL); secrets from the environment or mounted files."""

from __future__ import annotations

import os
from pathlib import Path

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


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Everything the API, the worker and the CLI read from the environment."""

    database_url: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 256 * 1024
    # A fan-out (up to 10,000 recipients) or a batch (up to 1,000 intents) may be this large.
    max_bulk_body_bytes: int = 16 * 1024 * 1024
    # The API's Prometheus /metrics: on its own listener (the operator's), never on the public one. No port: not served.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    pool_min: int = 2
    pool_max: int = 10
    # worker
    batch_size: int = 100
    max_in_flight: int = 100
    lease_seconds: int = 60
    dispatch_linger_ms: float = 250.0
    callback_batch_size: int = 50
    # Development mode: callback URLs may be http and private/loopback (a receiver on localhost).
    dev_mode: bool = False
    log_deliveries: bool = True  # one log line per delivery attempt (DISPATCHER_LOG_DELIVERIES=0 turns it off)
    worker_concurrency: int = 4
    # rendering (tenant templates are untrusted: docs/security.md, "Templates and the shared worker")
    render_processes: int = 2
    render_timeout_ms: float = 500.0
    render_memory_mb: int = 256
    render_max_chars: int = 64 * 1024
    render_max_html_chars: int = 256 * 1024
    render_max_subject_chars: int = 1024
    # mock provider
    mock_webhook_secret: str | None = None
    mock_webhook_url: str | None = None
    mock_latency_ms: float = 0.0
    mock_failure_rate: float = 0.0
    mock_status_delay_ms: float = 200.0
    mock_outcomes: dict[str, str] = {}
    mock_record: bool = True
    bench_baseline: bool = False
    webhook_tolerance_seconds: int = 300
    # real providers: deployment-wide webhook secrets (a Meta app, an ESP account serve every tenant)
    whatsapp_app_secrets: list[str] = []
    whatsapp_verify_token: str | None = None
    sendgrid_verification_key: str | None = None
    mailgun_signing_key: str | None = None
    public_url: str | None = None
    unsubscribe_secret: str | None = None
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        url = os.environ.get("DATABASE_URL") or secret("DISPATCHER_DATABASE_URL")
        if not url and "database_url" not in overrides:
            raise SystemExit("DATABASE_URL is not set (dispatcher dev starts an embedded Postgres instead)")
        port = _int("DISPATCHER_PORT", 8000)
        values: dict[str, object] = dict(
            database_url=url or "",
            host=os.environ.get("DISPATCHER_HOST", "127.0.0.1"),
            port=port,
            max_body_bytes=_int("DISPATCHER_MAX_BODY_BYTES", 256 * 1024),
            max_bulk_body_bytes=_int("DISPATCHER_MAX_BULK_BODY_BYTES", 16 * 1024 * 1024),
            metrics_port=_int("DISPATCHER_METRICS_PORT", 0) or None,
            metrics_host=os.environ.get("DISPATCHER_METRICS_HOST", "127.0.0.1"),
            pool_min=_int("DISPATCHER_POOL_MIN", 2),
            pool_max=_int("DISPATCHER_POOL_MAX", 10),
            batch_size=_int("DISPATCHER_BATCH_SIZE", 100),
            max_in_flight=_int("DISPATCHER_MAX_IN_FLIGHT", 100),
            lease_seconds=_int("DISPATCHER_LEASE_SECONDS", 60),
            dispatch_linger_ms=_float("DISPATCHER_DISPATCH_LINGER_MS", 250.0),
            callback_batch_size=_int("DISPATCHER_CALLBACK_BATCH_SIZE", 50),
            dev_mode=os.environ.get("DISPATCHER_DEV_MODE", "0") in ("1", "true", "yes"),
            log_deliveries=os.environ.get("DISPATCHER_LOG_DELIVERIES", "1") not in ("0", "false", "no"),
            worker_concurrency=_int("DISPATCHER_WORKER_CONCURRENCY", 4),
            render_processes=_int("DISPATCHER_RENDER_PROCESSES", 2),
            render_timeout_ms=_float("DISPATCHER_RENDER_TIMEOUT_MS", 500.0),
            render_memory_mb=_int("DISPATCHER_RENDER_MEMORY_MB", 256),
            render_max_chars=_int("DISPATCHER_RENDER_MAX_CHARS", 64 * 1024),
            render_max_html_chars=_int("DISPATCHER_RENDER_MAX_HTML_CHARS", 256 * 1024),
            render_max_subject_chars=_int("DISPATCHER_RENDER_MAX_SUBJECT_CHARS", 1024),
            mock_webhook_secret=secret("DISPATCHER_MOCK_WEBHOOK_SECRET"),
            mock_webhook_url=os.environ.get("DISPATCHER_MOCK_WEBHOOK_URL")
            or f"http://127.0.0.1:{port}/public/webhooks/mock",
            mock_latency_ms=_float("DISPATCHER_MOCK_LATENCY_MS", 0.0),
            mock_failure_rate=_float("DISPATCHER_MOCK_FAILURE_RATE", 0.0),
            mock_status_delay_ms=_float("DISPATCHER_MOCK_STATUS_DELAY_MS", 200.0),
            mock_outcomes=msgspec.json.decode(os.environ.get("DISPATCHER_MOCK_OUTCOMES") or "{}", type=dict[str, str]),
            mock_record=os.environ.get("DISPATCHER_MOCK_RECORD", "1") not in ("0", "false", "no"),
            bench_baseline=os.environ.get("DISPATCHER_BENCH_BASELINE", "") in ("1", "true", "yes"),
            webhook_tolerance_seconds=_int("DISPATCHER_WEBHOOK_TOLERANCE_SECONDS", 300),
            whatsapp_app_secrets=(secret("DISPATCHER_WHATSAPP_APP_SECRET") or "").split(),
            whatsapp_verify_token=secret("DISPATCHER_WHATSAPP_VERIFY_TOKEN"),
            sendgrid_verification_key=secret("DISPATCHER_SENDGRID_VERIFICATION_KEY"),
            mailgun_signing_key=secret("DISPATCHER_MAILGUN_SIGNING_KEY"),
            public_url=os.environ.get("DISPATCHER_PUBLIC_URL") or None,
            unsubscribe_secret=secret("DISPATCHER_UNSUBSCRIBE_SECRET"),
            log_level=os.environ.get("DISPATCHER_LOG_LEVEL", "INFO"),
        )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
