"""Attack: read the HTTP access log for what paths carried (an e-mail, a phone, an unsubscribe token, a capability)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from dispatcher import keys
from dispatcher.logs import JsonFormatter
from providers.unsubscribe import make_token
from tests.conftest import ROOT, app_url, call, free_port, url_of

SECRET = "unsubscribe-secret-for-tests"
TOKEN = make_token(SECRET, uuid.uuid4(), uuid.uuid4())
SIGNATURE = TOKEN.rsplit(".", 1)[1]
PATHS = [
    "/internal/recipients/carol%40example.net",
    "/internal/recipients/carol@example.net",
    "/internal/recipients/carol%2540example.net",
    "/internal/recipients/%2B34600111222",
    "/internal/recipients/+34600111222",
    "/internal/recipients/34600111222",
    f"/public/unsubscribe/{TOKEN}",
    f"/public/unsubscribe/{TOKEN.replace('.', '%2E')}",
    "/internal/templates?key=carol%40example.net&phone=%2B34600111222",
]
SECRETS = ["carol", "34600111222", SIGNATURE, SIGNATURE[:12]]


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_dispatcher_serve_logs_no_address_or_token(db: psycopg.Connection, tmp_path: Path) -> None:
    port = free_port()
    with psycopg.connect(url_of(db), autocommit=True) as conn:
        tenant = str(call(conn, "notify_api.create_tenant_v1('acme')")["id"])
        key = keys.generate()
        call(conn, "notify_api.create_api_key_v1(%s, 'tests', %s, %s)", tenant, keys.display_prefix(key), keys.digest(key))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(
        {
            "DATABASE_URL": app_url(url_of(db)),
            "DISPATCHER_UNSUBSCRIBE_SECRET": SECRET,
            "DISPATCHER_LOG_LEVEL": "DEBUG",
            "PYTHONPATH": str(ROOT),
        }
    )
    log = tmp_path / "api.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatcher", "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for path in PATHS:
                for headers in ({}, {"Authorization": f"Bearer {key}"}):
                    c.get(path, headers=headers)
                c.post(path, headers={"Authorization": f"Bearer {key}", "X-Request-ID": path.replace("%", "")[:200]})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text(errors="replace")
    assert '"path"' in text and "/internal/recipients/" in text, text[:2000]  # the access lines are there
    assert _leaks(text) == [], [line for line in text.splitlines() if _leaks(line)][:5]


@pytest.mark.parametrize("path", PATHS)
def test_uvicorns_access_log_format_is_masked(path: str) -> None:
    """uvicorn's own access logger (when run as `uvicorn api.app:app_from_env`): its line, through our formatter."""
    from urllib.parse import quote

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:50000", "GET", quote(path, safe="/?&=%+@"), "1.1", 404),
        None,
    )
    line = JsonFormatter().format(record)
    assert _leaks(line) == [], line
