"""Many idempotency keys, each submitted by 20 concurrent clients (reference/reliability.md 6.3, checklist #1):
exactly one request per key, every other response its replay, no duplicate deliveries.

Direct SQL runs at full size in the suite (RACE_KEYS, default 10,000 keys x 20 clients = 200,000 calls); HTTP runs
a smaller count (RACE_HTTP_KEYS, default 500 x 20 = 10,000 requests) through the real API process.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import app_url, call, start_service, stop_service, url_of

pytestmark = pytest.mark.slow

CLIENTS = 20
CHUNK = 50  # all clients work on the same 50 keys, in their own random order, before moving on: real contention


def body(n: int) -> dict[str, Any]:
    return {
        "recipient": {"ref": f"racer-{n % 997}", "addresses": {"email": f"racer-{n % 997}@example.com"}},
        "channels": ["email"],
        "template": "ping",
        "variables": {"n": str(n)},
    }


def race(
    keys: int, make_client: Callable[[], Any], submit_one: Callable[[Any, int], tuple[str, bool, int]]
) -> dict[int, list[tuple[str, bool, int]]]:
    """Runs CLIENTS threads over `keys` keys; returns every (notification id, replayed, status) by key."""
    results: dict[int, list[tuple[str, bool, int]]] = defaultdict(list)
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS)
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            conn = make_client()
            mine: list[tuple[int, tuple[str, bool, int]]] = []
            for start in range(0, keys, CHUNK):
                chunk = list(range(start, min(start + CHUNK, keys)))
                rng.shuffle(chunk)
                barrier.wait(timeout=120)
                mine += [(n, submit_one(conn, n)) for n in chunk]
            conn.close()
            with lock:
                for n, outcome in mine:
                    results[n].append(outcome)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    return results


def check(results: dict[int, list[tuple[str, bool, int]]], keys: int, db: psycopg.Connection, label: str, seconds: float) -> None:
    assert len(results) == keys
    originals = replays = 0
    for n, outcomes in results.items():
        assert len(outcomes) == CLIENTS, n
        assert len({notification for notification, _, _ in outcomes}) == 1, f"key {n}: more than one notification"
        first = [o for o in outcomes if not o[1]]
        assert len(first) == 1, f"key {n}: {len(first)} originals"
        originals += 1
        replays += len(outcomes) - 1
    requests, deliveries, distinct = db.execute("""
        select (select count(*) from notify.notification_requests),
               (select count(*) from notify.notification_deliveries),
               (select count(distinct (request_id, recipient_id, channel)) from notify.notification_deliveries)""").fetchone()
    assert (requests, deliveries, distinct) == (keys, keys, keys)
    total = keys * CLIENTS
    print(
        f"\n{label}: {keys:,} keys x {CLIENTS} clients = {total:,} submissions in {seconds:.1f} s ({total / seconds:,.0f}/s): "
        f"{requests:,} requests, {originals:,} originals, {replays:,} replays, 0 duplicate deliveries"
    )


@pytest.fixture
def pinged(db: psycopg.Connection, tenant: str) -> str:
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'ping', %s)",
        tenant,
        Jsonb({"channels": {"email": {"subject": "Ping", "text": "#{{n}}"}}}),
    )
    return tenant


def test_ten_thousand_keys_twenty_clients_each_over_sql(db: psycopg.Connection, db_url: str, pinged: str) -> None:
    keys = int(os.environ.get("RACE_KEYS", "10000"))
    url = app_url(db_url)

    def submit_one(conn: psycopg.Connection, n: int) -> tuple[str, bool, int]:
        response, replayed = conn.execute(
            "select response, replayed from notify_api.submit_notification_v1(%s, %s, %s)", (pinged, Jsonb(body(n)), f"race-{n}")
        ).fetchone()  # type: ignore[misc]
        return response["id"], replayed, 200

    started = time.monotonic()
    results = race(keys, lambda: psycopg.connect(url, autocommit=True), submit_one)
    check(results, keys, db, "idempotency race over SQL", time.monotonic() - started)


def test_many_keys_twenty_clients_each_over_http(db: psycopg.Connection, tmp_path: Path) -> None:
    keys = int(os.environ.get("RACE_HTTP_KEYS", "500"))
    svc = start_service(url_of(db), tmp_path, {"DISPATCHER_MOCK_WEBHOOK_SECRET": "", "DISPATCHER_MOCK_RECORD": "0"})
    try:
        with svc.client() as c:
            assert (
                c.put("/internal/templates/ping", json={"channels": {"email": {"subject": "Ping", "text": "#{{n}}"}}}).status_code
                == 200
            )

        def submit_one(client: httpx.Client, n: int) -> tuple[str, bool, int]:
            for _ in range(50):
                response = client.post("/internal/notifications", json=body(n), headers={"Idempotency-Key": f"race-{n}"})
                if response.status_code == 409:  # in flight elsewhere: retry after the hinted delay
                    time.sleep(float(response.headers.get("retry-after", "0.05")))
                    continue
                assert response.status_code in (200, 202), response.text
                return response.json()["id"], response.headers.get("idempotent-replayed") == "true", response.status_code
            raise AssertionError("still in flight after 50 tries")

        started = time.monotonic()
        results = race(keys, lambda: svc.client(), submit_one)
        elapsed = time.monotonic() - started
        for outcomes in results.values():
            assert sorted(status for _, _, status in outcomes) == [200] * (CLIENTS - 1) + [202]
        check(results, keys, db, "idempotency race over HTTP", elapsed)
    finally:
        stop_service(svc)
