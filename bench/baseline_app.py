"""Plain procrastinate, one no-op job per message: the dispatch benchmark's baseline (same machine, same run)."""

import os

import procrastinate

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=os.environ.get("DATABASE_URL", "")))


@app.task(name="bench_noop", queue="bench")
async def noop(n: int) -> None:
    return None
