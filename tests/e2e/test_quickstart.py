"""The Quickstart as a user runs it: `dispatcher dev` with no DATABASE_URL starts an embedded Postgres,
migrates, prints a dev API key, and a notification submitted with that key reaches delivered; Ctrl-C stops all."""

from __future__ import annotations

import time

import pytest

from tests.conftest import REMINDER, intent
from tests.e2e.dev_stack import DevStack

pytestmark = pytest.mark.slow


def test_dispatcher_dev_end_to_end(tmp_path):  # noqa: ANN001
    stack = DevStack(tmp_path / "state", tmp_path / "dev.log")
    log, key = stack.log, stack.key
    try:
        with stack.client() as c:
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
        code = stack.stop()
    assert code == 0, log.read_text()
    assert "stopped" in log.read_text()
    # the same key and data survive a restart
    assert (tmp_path / "state" / "dev_api_key").read_text().strip() == key
