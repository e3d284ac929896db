"""procrastinate tasks: `dispatch(channel)` drains due deliveries in batches; `maintenance` runs periodically.

A dispatch job is only a wake-up ("there is due work on this channel"); the deliveries table is the queue.
The App (runner/app.py) lists this module in its import_paths: procrastinate imports it when a worker starts or a
task is deferred by name, and it registers the tasks on that App (this module imports the App, never the reverse).
"""

from __future__ import annotations

import logging
from typing import Any

from procrastinate import JobContext, jobs

from dispatcher import settings
from runner.app import app
from runner.context import drainer_for, sender_for

log = logging.getLogger("runner")

MAINTENANCE = "select notify_api.run_maintenance_v1() as result"
RETENTION = "select notify_api.run_retention_v1() as result"
SCRUB = "select notify_api.scrub_expired_v1(%(limit)s) as result"
SCRUB_BATCH = 1000
SCRUB_MAX_BATCHES = 1000  # per run: a backlog larger than a million rows per kind goes on at the next run


@app.task(name="callbacks", queue="callbacks", pass_context=True)
async def callbacks(context: JobContext) -> dict[str, int]:
    """Wake-up for status callbacks: post every due message of the outbox."""
    return await sender_for(context).drain()


@app.task(name="dispatch", queue="dispatch", pass_context=True)
async def dispatch(context: JobContext, channel: str) -> dict[str, int]:
    """Wake-up for one channel: drain its due deliveries."""
    return await drainer_for(context).drain(channel)


@app.periodic(cron=settings.read("maintenance_cron"), periodic_id="maintenance")
@app.task(name="maintenance", queue="maintenance", queueing_lock="maintenance", pass_context=True)
async def maintenance(context: JobContext, timestamp: int) -> dict[str, Any]:
    """Every 10 s (DISPATCHER_MAINTENANCE_CRON, seconds last): expired leases, expired deadlines, safety-net wake-ups, stalled "
    "procrastinate jobs."""
    assert context.app is not None
    row = await context.app.connector.execute_query_one_async(MAINTENANCE)
    result = dict(row["result"])
    # A stalled wake-up is not retried (a new one may already be pending under the same queueing lock);
    # it is closed as failed, and the deliveries it was draining come back through their leases.
    stalled = list(await context.app.job_manager.get_stalled_jobs())
    for job in stalled:
        await context.app.job_manager.finish_job(job, status=jobs.Status.FAILED, delete_job=False)
    result["stalled_jobs"] = len(stalled)
    if any(result.get(k) for k in ("requeued", "unknown", "expired", "unknown_finalized", "stalled_jobs")):
        log.info("maintenance", extra=result)
    return result


@app.periodic(cron=settings.read("retention_cron"), periodic_id="retention")
@app.task(name="retention", queue="maintenance", queueing_lock="retention", pass_context=True)
async def retention(context: JobContext, timestamp: int) -> dict[str, Any]:
    """Every 10 minutes (DISPATCHER_RETENTION_CRON): daily partitions made a week ahead and dropped past the longest
    history period, expired personal data scrubbed in batches of 1,000 rows (a transaction each, so no lock is held
    long), finished procrastinate jobs older than DISPATCHER_JOB_RETENTION_HOURS deleted (docs/operations.md, "Retention")."""
    assert context.app is not None
    connector = context.app.connector
    row = await connector.execute_query_one_async(RETENTION)
    result: dict[str, Any] = dict(row["result"])
    scrubbed: dict[str, int] = {}
    for _ in range(SCRUB_MAX_BATCHES):
        batch = dict((await connector.execute_query_one_async(SCRUB, limit=SCRUB_BATCH))["result"])
        more = batch.pop("more")
        for kind, n in batch.items():
            scrubbed[kind] = scrubbed.get(kind, 0) + int(n)
        if not more:
            break
    result["scrubbed"] = scrubbed
    # procrastinate's own clean-up (one statement; successful jobs are deleted at once, so only failed, cancelled and
    # aborted wake-ups are left for it).
    await context.app.job_manager.delete_old_jobs(
        nb_hours=settings.read("job_retention_hours"), include_failed=True, include_cancelled=True, include_aborted=True
    )
    if result["partitions_created"] or result["partitions_dropped"] or any(scrubbed.values()):
        log.info("retention", extra=result)
    return result
