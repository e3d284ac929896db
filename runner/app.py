"""The procrastinate App: `procrastinate --app=runner.app.app worker` and `dispatcher worker` both use it.

The connection string comes from DATABASE_URL when the pool opens (not at import), so other
code and tests can derive apps for other databases with `app.with_connector(...)`.
"""

from __future__ import annotations

import os

import msgspec
import procrastinate


class _LazyConninfoConnector(procrastinate.PsycopgConnector):
    """A PsycopgConnector that reads DATABASE_URL when it opens, not when the module is imported."""

    async def open_async(self, pool=None, **kwargs):  # type: ignore[no-untyped-def]
        if pool is None and not self._pool_args.get("conninfo"):
            self._pool_args["conninfo"] = os.environ.get("DATABASE_URL", "")
        return await super().open_async(pool, **kwargs)


def make_connector(conninfo: str = "", *, max_size: int = int(os.environ.get("DISPATCHER_WORKER_POOL_MAX", "20"))) -> procrastinate.PsycopgConnector:
    # msgspec for the jsonb the worker exchanges with Postgres (a batch is hundreds of objects each way).
    kwargs = {"min_size": 1, "max_size": max_size, "kwargs": {"application_name": "dispatcher-worker"},
              "json_dumps": msgspec.json.encode, "json_loads": msgspec.json.decode}
    if conninfo:
        return procrastinate.PsycopgConnector(conninfo=conninfo, **kwargs)
    return _LazyConninfoConnector(**kwargs)


app = procrastinate.App(
    connector=make_connector(),
    import_paths=["runner.tasks"],
    worker_defaults={
        "queues": ["dispatch", "callbacks", "maintenance"],
        # Wake-up jobs carry no information once done: keep procrastinate's tables small.
        "delete_jobs": "successful",
        # LISTEN/NOTIFY wakes us for immediate work; scheduled wake-ups (send_at, retries), and a NOTIFY that
        # arrived while every slot was busy, are found by polling this often (a cheap indexed query).
        "fetch_job_polling_interval": 0.2,
        # Jobs at once: a drain per channel, the callbacks drain and maintenance.
        "concurrency": int(os.environ.get("DISPATCHER_WORKER_CONCURRENCY", "4")),
        "shutdown_graceful_timeout": 30.0,
    },
)

import runner.tasks  # noqa: E402,F401  (registers the tasks on `app`)
