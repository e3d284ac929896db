"""Scenario 11 of the benchmark (bench/run.py): priority and tenant fairness (issue #14, part 4).

Tenant A has a backlog of 100,000 bulk e-mail deliveries; tenant B submits one notification at a steady rate (20/s
by default) over HTTP while the worker drains A's backlog. Reported, each against a baseline measured in the same run:
- B's latency, submit -> provider call (the submit transaction's start to the claim that hands the delivery to the
  provider, both Postgres timestamps, as scenario 5), p50 and p99, against B at the same rate alone (no backlog):
  target p99 at most twice the alone figure;
- A's drain rate with B's trickle beside it, against A's same backlog drained alone (scenario 3's shape, same run),
  and against scenario 3's figure when it ran in the same invocation.

The backlog's priority is set with an UPDATE after the fan-outs (then VACUUM ANALYZE, on both of A's drains alike), so
the scenario does not depend on the submission's `priority` field.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import psycopg

from dispatcher import keys

if TYPE_CHECKING:
    from bench.run import Stack

B_RATE = 20.0  # B's submissions per second


def tenant_b(stack: Stack) -> tuple[str, str]:
    """A second tenant with its own key and the bench's template: (tenant id, API key)."""
    from bench.run import TEMPLATE

    with psycopg.connect(stack.url, autocommit=True) as conn:
        tenant = conn.execute("select notify_api.create_tenant_v1('bench-b')").fetchone()[0]["id"]  # type: ignore[index]
        key = keys.generate()
        conn.execute(
            "select notify_api.create_api_key_v1(%s, 'bench-b', %s, %s)", (tenant, keys.display_prefix(key), keys.digest(key))
        )
        conn.execute(
            "select notify_api.upsert_template_v1(%s, 'event_reminder', %s)", (tenant, psycopg.types.json.Jsonb(TEMPLATE))
        )
        conn.execute("select notify_api.set_api_rate_v1(%s, 1000000)", (tenant,))
    return str(tenant), key


class Trickle:
    """Submits one e-mail notification every 1/rate s (open loop: a slow answer does not delay the next request), in
    a thread of its own with its own event loop, until stopped."""

    def __init__(self, stack: Stack, key: str, rate: float) -> None:
        self.base = f"http://127.0.0.1:{stack.port}"
        self.key = key
        self.rate = rate
        self.sent = 0
        self.failed = 0
        self.answered_ms: list[float] = []  # each submission's HTTP round trip (its commit included)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._run_id = time.time_ns()

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as client:
            tasks: set[asyncio.Task[None]] = set()
            start = time.monotonic()
            i = 0
            while not self._stop.is_set():
                delay = start + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(self._one(client, i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, client: httpx.AsyncClient, i: int) -> None:
        n = i % 100
        body = {
            "recipient": {"ref": f"b-member-{n}", "addresses": {"email": f"b-member{n}@example.com"}},
            "channels": ["email"],
            "template": "event_reminder",
            "variables": {"name": "Ben", "event": "Password reset"},
        }
        try:
            t0 = time.perf_counter()
            r = await client.post("/internal/notifications", json=body, headers={"Idempotency-Key": f"fair-{self._run_id}-{i}"})
            if r.status_code == 202:
                self.sent += 1
                self.answered_ms.append((time.perf_counter() - t0) * 1000)
            else:
                self.failed += 1
        except httpx.HTTPError:
            self.failed += 1

    def start(self) -> Trickle:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def figures(self) -> dict[str, Any]:
        answered = sorted(self.answered_ms)
        p99 = answered[min(len(answered) - 1, int(len(answered) * 0.99))] if answered else float("nan")
        return {
            "failed": self.failed,
            "http_p50_ms": round(statistics.median(answered), 1) if answered else None,
            "http_p99_ms": round(p99, 1),
        }


def latency(stack: Stack, tenant: str, since: Any, until: Any, waited_for: str | None = None) -> dict[str, Any]:
    """Submit -> provider call of the tenant's requests created in [since, until); with waited_for (another tenant),
    also how many of that tenant's claims started between a request's submission and its own claim (the claims it
    waited through: 0 or 1 when the claim serves it first, the whole backlog's worth when it queues behind it)."""
    with psycopg.connect(stack.url) as conn:
        waited = None
        if waited_for:
            waited = conn.execute(
                """with b as (select r.created_at, a.started_at
                                from notify.notification_requests r
                                join notify.notification_deliveries d on d.tenant_id = r.tenant_id and d.request_id = r.id
                                join notify.delivery_attempts a on a.tenant_id = d.tenant_id and a.delivery_id = d.id
                                 and a.attempt = 1
                               where r.tenant_id = %s and r.created_at >= %s and r.created_at < %s),
                        claims as (select distinct started_at from notify.delivery_attempts where tenant_id = %s
                                      and started_at >= %s)
                   select max(n), percentile_cont(0.5) within group (order by n)
                     from (select (select count(*) from claims c where c.started_at > b.created_at
                                     and c.started_at < b.started_at) as n from b) x""",
                (tenant, since, until, waited_for, since),
            ).fetchone()
        row = conn.execute(
            """select percentile_cont(0.5) within group (order by ms), percentile_cont(0.99) within group (order by ms),
                      max(ms), count(*)
                 from (select extract(epoch from a.started_at - r.created_at) * 1000 as ms
                         from notify.notification_requests r
                         join notify.notification_deliveries d on d.tenant_id = r.tenant_id and d.request_id = r.id
                         join notify.delivery_attempts a on a.tenant_id = d.tenant_id and a.delivery_id = d.id and a.attempt = 1
                        where r.tenant_id = %s and r.created_at >= %s and r.created_at < %s) x""",
            (tenant, since, until),
        ).fetchone()
        submitted = conn.execute(
            "select count(*) from notify.notification_requests where tenant_id = %s and created_at >= %s and created_at < %s",
            (tenant, since, until),
        ).fetchone()
    assert row is not None and submitted is not None
    if not row[3]:
        raise RuntimeError(
            f"fairness: none of tenant {tenant}'s {submitted[0]} requests was dispatched; see {stack.work}/worker.log"
        )
    return {
        "submitted": submitted[0],
        "measured": row[3],
        "p50_ms": round(row[0], 1),
        "p99_ms": round(row[1], 1),
        "max_ms": float(round(row[2], 1)),
        **({"claims_waited_max": waited[0], "claims_waited_p50": waited[1]} if waited else {}),
    }


def bulk_backlog(stack: Stack, n: int, prefix: str, priority: str) -> None:
    from bench.run import backlog

    backlog(stack, n, prefix)
    with psycopg.connect(stack.url, autocommit=True) as conn:
        conn.execute("set notify.source = 'bench'")
        conn.execute(
            "update notify.notification_deliveries set priority = %s where tenant_id = %s and status = 'queued'",
            (priority, stack.tenant_id),
        )
        conn.execute("vacuum analyze notify.notification_deliveries")


def drain_a(stack: Stack, n: int, priority: str, batch: int = 500) -> dict[str, Any]:
    """Drains A's backlog (scenario 3's settings) with the worker: waits for A's rows only, so B's trickle beside it
    does not keep the drain going; A's rate over the first claim to the last outcome of A's deliveries."""
    from bench.run import rss_mb

    stack.sql("delete from procrastinate_jobs where status = 'todo' and task_name = 'dispatch'")
    started = stack.sql("select now()")
    worker = stack.start_worker(DISPATCHER_BATCH_SIZE=str(batch), DISPATCHER_MAX_IN_FLIGHT="1000")
    deadline = time.monotonic() + 900
    # through the queue's index (channel, priority, tenant_id, due_at) and the leases' index, as drain() does
    while stack.sql(
        "select exists (select from notify.notification_deliveries where channel = 'email' and priority = %s and tenant_id = %s"
        " and status in ('queued', 'scheduled') and status = 'queued')"
        " or exists (select from notify.notification_deliveries where status = 'sending' and tenant_id = %s)",
        priority,
        stack.tenant_id,
        stack.tenant_id,
    ):
        if time.monotonic() > deadline or worker.poll() is not None:
            raise RuntimeError("fairness: A's drain did not finish")
        time.sleep(0.25)
    with psycopg.connect(stack.url) as conn:
        first, last, done, claims = conn.execute(  # type: ignore[misc]
            """select min(started_at), max(finished_at), count(*) filter (where outcome = 'sent'), count(distinct started_at)
                 from notify.delivery_attempts where tenant_id = %s and started_at >= %s""",
            (stack.tenant_id, started),
        ).fetchone()
    span = (last - first).total_seconds()
    peak = rss_mb(worker.pid)
    return {
        "deliveries": done,
        "seconds": round(span, 2),
        "per_s": round(done / span),
        "claims": claims,  # a claim's attempts share its transaction's now()
        "worker_peak_rss_mb": peak,
        "first_claim": first,
        "last_outcome": last,
        "worker": worker,
    }


def scenario_fairness(
    stack: Stack,
    n: int,
    seconds: int,
    priority: str = "bulk",
    rate: float = B_RATE,
    batch: int = 500,
    scenario3: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from bench.run import log

    b_tenant, b_key = tenant_b(stack)

    # B alone: the worker idle but for B's trickle.
    log(f"fairness: tenant B alone at {rate:g}/s for {seconds}s")
    worker = stack.start_worker(DISPATCHER_BATCH_SIZE=str(batch), DISPATCHER_MAX_IN_FLIGHT="1000")
    time.sleep(3)
    since = stack.sql("select now()")
    trickle = Trickle(stack, b_key, rate).start()
    time.sleep(seconds)
    until = stack.sql("select now()")
    trickle.stop()
    time.sleep(2)
    stack.stop(worker)
    alone = latency(stack, b_tenant, since, until) | trickle.figures()
    log(f"fairness: B alone {alone}")

    # A alone: scenario 3's drain of the same backlog at A's priority.
    log(f"fairness: tenant A's {n:,} {priority} deliveries drained alone")
    bulk_backlog(stack, n, "fa-", priority)
    a_alone = drain_a(stack, n, priority, batch)
    stack.stop(a_alone.pop("worker"))
    for k in ("first_claim", "last_outcome"):
        a_alone.pop(k)
    log(f"fairness: A alone {a_alone}")

    # A's backlog again, B at the same rate from before the worker starts until A's backlog is drained.
    log(f"fairness: tenant A's {n:,} {priority} deliveries drained with tenant B at {rate:g}/s")
    bulk_backlog(stack, n, "fb-", priority)
    trickle = Trickle(stack, b_key, rate).start()
    time.sleep(1)
    a_with_b = drain_a(stack, n, priority, batch)
    trickle.stop()
    time.sleep(2)
    stack.stop(a_with_b.pop("worker"))
    # B's requests created while A's backlog was being drained: from A's first claim to A's last outcome
    during = latency(stack, b_tenant, a_with_b.pop("first_claim"), a_with_b.pop("last_outcome"), waited_for=stack.tenant_id)
    during.update(trickle.figures())
    log(f"fairness: A with B {a_with_b}; B during A's drain {during}")

    result = {
        "rate_per_s": rate,
        "backlog": n,
        "priority": priority,
        "batch": batch,
        "b_alone": alone,
        "b_during_drain": during,
        "b_p99_ratio": round(during["p99_ms"] / alone["p99_ms"], 2),
        "b_p50_ratio": round(during["p50_ms"] / alone["p50_ms"], 2),
        "a_alone": a_alone,
        "a_with_b": a_with_b,
        "a_ratio": round(a_with_b["per_s"] / a_alone["per_s"], 3),
    }
    if scenario3:
        result["scenario3_per_s"] = scenario3["per_s"]
        result["a_ratio_to_scenario3"] = round(a_with_b["per_s"] / scenario3["per_s"], 3)
    return result


def report_rows(f: dict[str, Any]) -> list[str]:
    alone, during = f["b_alone"], f["b_during_drain"]
    verdict = "met" if f["b_p99_ratio"] <= 2 else "missed"
    backlog = f"{f['backlog']:,} {f['priority']}"
    if f.get("batch", 500) != 500:
        backlog += f" (claims of {f['batch']})"
    waited = ""
    if "claims_waited_max" in during:
        waited = (
            f"; A's claims started between B's submit and its claim: median {during['claims_waited_p50']:g}, "
            f"max {during['claims_waited_max']}"
        )
    rows = [
        f"| 11 | fairness: tenant B at {f['rate_per_s']:g}/s over HTTP during tenant A's {backlog} backlog's drain: "
        f"B's submit → provider call | p50 {during['p50_ms']} ms, p99 {during['p99_ms']} ms ({during['measured']} requests; "
        f"B's own HTTP submission p50 {during['http_p50_ms']} ms, p99 {during['http_p99_ms']} ms{waited}) "
        f"| B alone: p50 {alone['p50_ms']} ms, p99 {alone['p99_ms']} ms ({alone['measured']} requests; HTTP submission "
        f"p50 {alone['http_p50_ms']} ms, p99 {alone['http_p99_ms']} ms) "
        f"| p99 {f['b_p99_ratio']}× | p99 ≤ 2× alone | {verdict} |"
    ]
    s3 = f"; scenario 3: {f['scenario3_per_s']:,}/s" if "scenario3_per_s" in f else ""
    rows.append(
        f"| 11 | fairness: A's drain meanwhile | {f['a_with_b']['per_s']:,} deliveries/s "
        f"| A's backlog drained alone: {f['a_alone']['per_s']:,}/s{s3} | {f['a_ratio']:.0%} | — | |"
    )
    return rows
