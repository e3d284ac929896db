"""The schema: sql/ (readable current state) and migrations/ (yoyo, forward only, checksummed).

`build_from_sql` loads procrastinate's schema and sql/*.sql in order (tests, comparisons);
`migrate` applies migrations/ with yoyo (production, `dispatcher migrate`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg

ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = ROOT / "sql"
MIGRATIONS_DIR = ROOT / "migrations"
CHECKSUMS = MIGRATIONS_DIR / "CHECKSUMS"

log = logging.getLogger("dispatcher.schema")


def sql_files() -> list[Path]:
    return sorted(SQL_DIR.glob("*.sql"))


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("*.sql"))


def build_from_sql(conn: psycopg.Connection) -> None:
    """Creates the current schema on an empty database from procrastinate's package and sql/."""
    from procrastinate.schema import SchemaManager

    conn.execute(SchemaManager.get_schema())  # type: ignore[arg-type]
    for path in sql_files():
        conn.execute(path.read_text())  # type: ignore[arg-type]


def file_checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recorded_checksums() -> dict[str, str]:
    result = {}
    for line in CHECKSUMS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split()
            result[name] = digest
    return result


def verify_checksums() -> list[str]:
    """Problems with landed migrations: edited, removed, or new and not yet recorded."""
    recorded = recorded_checksums()
    present = {p.name: file_checksum(p) for p in migration_files()}
    problems = [f"{name}: edited after landing" for name in recorded if name in present and present[name] != recorded[name]]
    problems += [f"{name}: removed after landing" for name in recorded if name not in present]
    problems += [
        f"{name}: not in migrations/CHECKSUMS (run: python -m dispatcher.schema record)"
        for name in present
        if name not in recorded
    ]
    return problems


def record_new_checksums() -> list[str]:
    """Appends the checksums of migrations not yet recorded; never rewrites a recorded one."""
    recorded = recorded_checksums()
    added = [p for p in migration_files() if p.name not in recorded]
    with CHECKSUMS.open("a") as f:
        for p in added:
            f.write(f"{file_checksum(p)}  {p.name}\n")
    return [p.name for p in added]


def yoyo_url(database_url: str) -> str:
    """yoyo wants the driver in the scheme: postgresql+psycopg://..."""
    scheme, rest = database_url.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgres", "postgresql") else database_url


class MigrationRefused(RuntimeError):
    """A migration was not applied: a landed file changed, or yoyo or the database refused it. str() is one line."""


def migrate(database_url: str) -> list[str]:
    """Applies pending migrations (after checking that landed ones are unchanged); returns their ids.

    Raises MigrationRefused with a one-line reason when a landed migration was edited or removed, or when yoyo or
    the database refuses a migration (nothing of that migration is applied: each runs in its own transaction)."""
    import yoyo.exceptions
    from yoyo import get_backend, read_migrations

    problems = [p for p in verify_checksums() if "not in migrations/CHECKSUMS" not in p]
    if problems:
        raise MigrationRefused("refusing to migrate: " + "; ".join(problems))
    current = None
    try:
        migrations = read_migrations(str(MIGRATIONS_DIR))
        with get_backend(yoyo_url(database_url)) as backend, backend.lock():  # closes its connection at the end
            pending = backend.to_apply(migrations)
            ids = [m.id for m in pending]
            for m in pending:
                current = m.id
                log.debug("applying migration", extra={"migration": m.id})
                # yoyo prints the rows of every statement that returns some (our `select notify._settle_owners()`)
                # as a psql-style table on stdout: swallow them, the caller prints one line.
                with contextlib.redirect_stdout(io.StringIO()):
                    backend.apply_one(m)
            current = None
            with contextlib.redirect_stdout(io.StringIO()):
                backend.run_post_apply(pending)
    except (yoyo.exceptions.BadMigration, yoyo.exceptions.LockTimeout, yoyo.exceptions.MigrationConflict) as exc:
        raise MigrationRefused(f"migration {current or '(reading migrations)'} refused: {_one_line(exc)}") from exc
    except psycopg.Error as exc:
        if current is None:
            raise  # could not connect or read yoyo's tables: the caller reports it like any database error
        reason = exc.diag.message_primary or _one_line(exc)
        raise MigrationRefused(f"migration {current} failed and was rolled back: {reason}") from exc
    try:
        restrict_public(database_url)
    except psycopg.Error as exc:
        raise MigrationRefused(
            f"migrations applied, but PUBLIC keeps TEMPORARY: {exc.diag.message_primary or _one_line(exc)} "
            "(run `dispatcher migrate` as the database owner or a superuser)"
        ) from exc
    return ids


def restrict_public(database_url: str) -> None:
    """Takes TEMPORARY (and CREATE on schema public) from PUBLIC on every run, not only in migration 0013: database
    privileges are not copied by CREATE DATABASE ... TEMPLATE, nor restored into an existing database by pg_restore."""
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True) as conn:
        row = conn.execute("select to_regprocedure('notify._restrict_public()') is not null").fetchone()
        if row and row[0]:
            conn.execute("select notify._restrict_public()")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def latest_migration() -> str:
    files = migration_files()
    return files[-1].stem if files else ""


def main() -> None:  # python -m dispatcher.schema [verify|record]
    import sys

    cmd = sys.argv[1] if len(sys.argv) > 1 else "verify"
    if cmd == "record":
        print("\n".join(record_new_checksums()) or "nothing new")
    else:
        problems = verify_checksums()
        print("\n".join(problems) or "migrations unchanged")
        raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()

__all__ = ["build_from_sql", "migrate", "verify_checksums", "parse_qs", "urlsplit"]
