"""The Quickstart as a user runs it: `dispatcher dev` with no DATABASE_URL starts an embedded Postgres,
migrates, prints a dev API key, and a notification submitted with that key reaches delivered; Ctrl-C stops all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import REMINDER, ROOT, free_port, intent

pytestmark = pytest.mark.slow


def test_dispatcher_dev_end_to_end(tmp_path):  # noqa: ANN001
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_") and k != "DATABASE_URL"}
    log = tmp_path / "dev.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatcher", "dev", "--port", str(port), "--data-dir", str(tmp_path / "state")],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        key = re.search(r"API key: (nd_\S+)", log.read_text()).group(1)  # type: ignore[union-attr]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
            assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
            assert (
                c.post(
                    "/internal/recipients/runner-42/consents",
                    json={"channel": "whatsapp", "status": "granted", "source": "signup_form"},
                ).status_code
                == 201
            )
            created = c.post("/internal/notifications", json=intent()).json()
            deadline = time.monotonic() + 20
            while True:
                body = c.get(f"/internal/notifications/{created['id']}").json()
                if {d["status"] for d in body["deliveries"]} == {"read", "delivered"}:
                    break
                assert time.monotonic() < deadline, body
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, log.read_text()
    assert "stopped" in log.read_text()
    # the same key and data survive a restart
    assert (tmp_path / "state" / "dev_api_key").read_text().strip() == key
