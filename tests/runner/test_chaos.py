"""Faults survived: the worker killed with SIGKILL at random moments while it drains a backlog; two workers on
one backlog. A checker then proves nothing was lost, WhatsApp was never sent twice, and counts e-mail duplicates.

The suite (and CI) runs the full size, 20,000 deliveries and 20 kills (about 25 s here); CHAOS_DELIVERIES and
CHAOS_KILLS change it, e.g. `CHAOS_DELIVERIES=50000 CHAOS_KILLS=40 scripts/test.sh tests/runner/test_chaos.py -s`."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from tests.conftest import REMINDER, ROOT, Service, call, start_service, stop_service, url_of

pytestmark = pytest.mark.slow
DELIVERIES = int(os.environ.get("CHAOS_DELIVERIES", "20000"))
KILLS = int(os.environ.get("CHAOS_KILLS", "20"))
FINAL = ("sent", "delivered", "read", "failed", "bounced", "suppressed", "cancelled", "expired", "unknown")


def backlog(svc: Service, total: int) -> None:
    with psycopg.connect(svc.db_url, autocommit=True) as conn:
        call(conn, "notify_api.set_channel_policy_v1(%s, 'whatsapp', 'opt_out')", svc.tenant_id)
    with svc.client() as c:
        assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
        per_request = 1000
        for start in range(0, total // 2, per_request):
            recipients = [
                {
                    "ref": f"m{start + i}",
                    "addresses": {"whatsapp": f"+3460{start + i:07d}", "email": f"m{start + i}@example.com"},
                    "variables": {"name": "A"},
                }
                for i in range(min(per_request, total // 2 - start))
            ]
            r = c.post(
                "/internal/notifications",
                json={
                    "recipients": recipients,
                    "channels": ["whatsapp", "email"],
                    "template": "event_reminder",
                    "variables": {"event": "x"},
                },
            )
            assert r.status_code == 202, r.text


def worker(svc: Service, log_name: str) -> subprocess.Popen[bytes]:
    log = svc.logs[0].parent / log_name
    svc.logs.append(log)
    return subprocess.Popen(
        [sys.executable, "-m", "dispatcher", "worker"], env=svc.env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def settle(svc: Service, total: int, timeout: float = 240) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    with psycopg.connect(svc.db_url, autocommit=True) as conn:
        while True:
            states = dict(conn.execute("select status::text, count(*) from notify.notification_deliveries group by 1").fetchall())
            if sum(states.values()) == total and not {"queued", "scheduled", "sending"} & set(states):
                return states
            if time.monotonic() > deadline:
                return states
            time.sleep(0.5)


def check(svc: Service, total: int) -> dict[str, int]:
    with psycopg.connect(svc.db_url) as conn:
        states = dict(conn.execute("select status::text, count(*) from notify.notification_deliveries group by 1").fetchall())
        assert sum(states.values()) == total, states  # nothing lost
        assert set(states) <= set(FINAL), states  # nothing left in flight
        twice = conn.execute("""select d.channel::text, count(*) from notify.mock_messages m
                                  join notify.notification_deliveries d on d.tenant_id = m.tenant_id and d.id = m.delivery_id
                                 group by d.channel, m.delivery_id having count(*) > 1""").fetchall()
        whatsapp_twice = sum(1 for channel, _ in twice if channel == "whatsapp")
        email_twice = sum(1 for channel, _ in twice if channel == "email")
        assert whatsapp_twice == 0, twice  # never a WhatsApp duplicate
        never_sent = conn.execute("""select count(*) from notify.notification_deliveries d
                                      where d.status in ('delivered', 'read')
                                        and not exists (select from notify.mock_messages m where m.delivery_id =
                                          d.id)""").fetchone()[0]
        assert never_sent == 0
    return {**states, "email_duplicates": email_twice}


def test_sigkill_at_random_moments_loses_nothing_and_never_doubles_whatsapp(db: psycopg.Connection, tmp_path) -> None:  # noqa: ANN001
    # No mock status reports here: the check is about what the worker sends, so deliveries end 'sent'.
    svc = start_service(
        url_of(db),
        tmp_path,
        {
            "DISPATCHER_MOCK_LATENCY_MS": "20",
            "DISPATCHER_LEASE_SECONDS": "2",
            "DISPATCHER_MAINTENANCE_CRON": "* * * * * *",
            "DISPATCHER_BATCH_SIZE": "50",
            "DISPATCHER_MAX_IN_FLIGHT": "100",
            "DISPATCHER_MOCK_WEBHOOK_SECRET": "",
        },
    )
    stop_service(Service(**{**svc.__dict__, "procs": [svc.procs.pop()]}))  # the backlog is built with no worker running
    try:
        backlog(svc, DELIVERIES)
        rng = random.Random(7)
        current = worker(svc, "chaos-0.log")
        for kill in range(KILLS):
            time.sleep(rng.uniform(0.2, 1.2))
            current.send_signal(signal.SIGKILL)
            current.wait(10)
            current = worker(svc, f"chaos-{kill + 1}.log")
        svc.procs.append(current)
        settle(svc, DELIVERIES)
        figures = check(svc, DELIVERIES)
        print(f"\nchaos: {DELIVERIES} deliveries, {KILLS} SIGKILLs -> {figures}")
    finally:
        stop_service(svc)


def test_two_workers_share_a_backlog_without_overlap(db: psycopg.Connection, tmp_path) -> None:  # noqa: ANN001
    svc = start_service(
        url_of(db),
        tmp_path,
        {
            "DISPATCHER_BATCH_SIZE": "25",
            "DISPATCHER_MAX_IN_FLIGHT": "50",
            "DISPATCHER_MOCK_LATENCY_MS": "5",
            "DISPATCHER_MOCK_WEBHOOK_SECRET": "",
        },
    )
    stop_service(Service(**{**svc.__dict__, "procs": [svc.procs.pop()]}))
    try:
        backlog(svc, 2000)
        svc.procs += [worker(svc, "w1.log"), worker(svc, "w2.log")]
        settle(svc, 2000)
        figures = check(svc, 2000)
        assert figures.get("email_duplicates") == 0
        with psycopg.connect(svc.db_url) as conn:
            calls = conn.execute("select count(*), count(distinct delivery_id) from notify.mock_messages").fetchone()
            workers = conn.execute("select count(distinct worker_id) from procrastinate_jobs").fetchone()
        assert calls[0] == calls[1] == 2000  # every delivery sent once
        print(f"\ntwo workers: {figures}, {workers[0]} worker ids still on record")
    finally:
        stop_service(svc)
