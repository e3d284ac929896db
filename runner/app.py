"""The procrastinate App: `procrastinate --app=runner.app.app worker` and `dispatcher worker` both use it.

The connection string comes from DATABASE_URL when the pool opens (not at import), so other
code and tests can derive apps for other databases with `app.with_connector(...)`.

Whichever CLI starts the worker, it is set up the same way, in `WorkerApp.run_worker_async` (the one call both
make): JSON logs with masking, tracing, DISPATCHER_WORKER_METRICS_PORT, the settings in the job context, and the
providers closed at the end. The tasks (runner/tasks.py) import this module and register on `app`; procrastinate
imports them through `import_paths` when a worker starts or a task is deferred by name. Loaded by procrastinate's own
CLI, this module also takes over that CLI's logging (which would otherwise be plain text) and routes its console
messages through the JSON logs.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
import procrastinate

from dispatcher import settings as declared
from dispatcher.settings import Settings
from runner.context import close_all

log = logging.getLogger("runner")


class _LazyConninfoConnector(procrastinate.PsycopgConnector):
    """A PsycopgConnector that reads DATABASE_URL when it opens, not when the module is imported."""

    async def open_async(self, pool=None, **kwargs):  # type: ignore[no-untyped-def]
        if pool is None and not self._pool_args.get("conninfo"):
            self._pool_args["conninfo"] = declared.read("database_url") or ""
        return await super().open_async(pool, **kwargs)


def make_connector(conninfo: str = "", *, max_size: int = declared.read("worker_pool_max")) -> procrastinate.PsycopgConnector:
    # msgspec for the jsonb the worker exchanges with Postgres (a batch is hundreds of objects each way).
    kwargs = {
        "min_size": 1,
        "max_size": max_size,
        "kwargs": {"application_name": "dispatcher-worker"},
        "json_dumps": msgspec.json.encode,
        "json_loads": msgspec.json.decode,
    }
    if conninfo:
        return procrastinate.PsycopgConnector(conninfo=conninfo, **kwargs)
    return _LazyConninfoConnector(**kwargs)


_settings: Settings | None = None


def prepare_process() -> Settings:
    """Once per worker process: settings, JSON masked logs, tracing, the metrics listener. Returns the Settings."""
    global _settings
    if _settings is None:
        from dispatcher import logs, tracing

        settings = Settings.from_env()
        logs.configure(settings.log_level)
        tracing.setup("dispatcher-worker")
        if settings.worker_metrics_port:
            from prometheus_client import start_http_server

            from dispatcher import metrics

            metrics.register_queue_health(settings.database_url)
            start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host)
        _settings = settings
    return _settings


class WorkerApp(procrastinate.App):
    """procrastinate's App whose worker is set up as our production worker, whichever CLI runs it."""

    async def run_worker_async(self, **kwargs: Any) -> None:
        settings = prepare_process()
        kwargs["additional_context"] = {"settings": settings, **(kwargs.get("additional_context") or {})}
        try:
            await super().run_worker_async(**kwargs)
        finally:
            await close_all()  # the drainers and senders made for this App's jobs


def _adopt_procrastinate_cli() -> None:
    """Under `procrastinate --app=runner.app.app …`: JSON logs from the first line (procrastinate's CLI then finds the
    root logger configured and leaves it alone) and its console messages ("Launching a worker…", exit messages)
    as JSON log lines too (errors when printed while handling an exception)."""
    import procrastinate.cli

    from dispatcher import logs

    logs.configure(declared.read("log_level"))
    cli_log = logging.getLogger("runner.cli")

    def print_stderr(*args: Any) -> None:
        message = " ".join(str(a) for a in args)
        (cli_log.error if sys.exc_info()[0] is not None else cli_log.info)(message)

    procrastinate.cli.print_stderr = print_stderr  # type: ignore[assignment]


app = WorkerApp(
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
        "concurrency": declared.read("worker_concurrency"),
        "shutdown_graceful_timeout": 30.0,
    },
)

if "procrastinate.cli" in sys.modules:  # loaded by procrastinate's CLI (procrastinate --app=runner.app.app worker)
    _adopt_procrastinate_cli()
