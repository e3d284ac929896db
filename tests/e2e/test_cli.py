"""The `dispatcher` CLI against a test database (migrate, tenant create, key create/list/revoke, psql), against a dev
data folder without DATABASE_URL, and a refused migration."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from cli import commands as cli
from dispatcher import keys, schema
from dispatcher.embedded import EmbeddedPostgres
from tests.conftest import ROOT


def run(url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=check
    )


def test_migrate_tenant_and_keys(pg_server):  # noqa: ANN001
    name = "cli_test"
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    url = pg_server.url(name)
    try:
        assert "0002_notify_core" in run(url, "migrate").stdout
        assert "queue empty" in run(url, "status").stdout and json.loads(run(url, "status", "--json").stdout) == []
        assert "up to date" in run(url, "migrate").stdout
        assert '"slug": "acme"' in run(url, "tenant", "create", "acme", "--name", "Acme").stdout
        assert "already exists" in run(url, "tenant", "create", "acme", check=False).stderr
        out = run(url, "key", "create", "--tenant", "acme", "--name", "ci").stdout
        key = re.search(r"^(nd_\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
        key_id = re.search(r"id ([0-9a-f-]{36})", out).group(1)  # type: ignore[union-attr]
        with psycopg.connect(url) as conn:
            assert conn.execute("select tenant_id from notify_api.authenticate_api_key_v1(%s)", (keys.digest(key),)).fetchone()
        listed = run(url, "key", "list", "--tenant", "acme").stdout
        assert key_id in listed and key not in listed
        rotated = run(url, "key", "rotate", "--tenant", "acme", key_id, "--overlap-seconds", "0").stdout
        new_key = re.search(r"^(nd_\S+)$", rotated, re.M).group(1)  # type: ignore[union-attr]
        with psycopg.connect(url) as conn:
            assert (
                conn.execute("select tenant_id from notify_api.authenticate_api_key_v1(%s)", (keys.digest(key),)).fetchone()
                is None
            )
            assert conn.execute(
                "select tenant_id from notify_api.authenticate_api_key_v1(%s)", (keys.digest(new_key),)
            ).fetchone()
        reader = run(url, "key", "create", "--tenant", "acme", "--scope", "read").stdout
        assert "scopes read)" in reader
        key = re.search(r"^(nd_\S+)$", run(url, "key", "create", "--tenant", "acme").stdout, re.M).group(1)  # type: ignore[union-attr]
        listed = json.loads(run(url, "key", "list", "--tenant", "acme").stdout)
        key_id = [k["id"] for k in listed if k["revoked_at"] is None and k["expires_at"] is None][-1]  # the one just made
        run(url, "key", "revoke", "--tenant", "acme", key_id)
        with psycopg.connect(url) as conn:
            assert (
                conn.execute("select tenant_id from notify_api.authenticate_api_key_v1(%s)", (keys.digest(key),)).fetchone()
                is None
            )
        assert "no tenant" in run(url, "key", "create", "--tenant", "nobody", check=False).stderr
        ungranted = run(
            url,
            "provider",
            "set",
            "--tenant",
            "acme",
            "--channel",
            "whatsapp",
            "--provider",
            "whatsapp_cloud",
            "--setting",
            "phone_number_id=106540352242922",
            "--secret",
            "access_token=env:ACME_WA_TOKEN",
            check=False,
        )
        assert ungranted.returncode != 0 and "namespace" in ungranted.stderr
        granted = json.loads(run(url, "tenant", "secrets", "--tenant", "acme", "--env-prefix", "ACME_").stdout)
        assert granted["env_prefix"] == "ACME_" and granted["private_endpoints"] is False
        granted = json.loads(run(url, "tenant", "secrets", "--tenant", "acme", "--file-dir", "/run/secrets/acme/").stdout)
        assert (granted["env_prefix"], granted["file_dir"]) == ("ACME_", "/run/secrets/acme/")  # options left out are kept
        out = run(
            url,
            "provider",
            "set",
            "--tenant",
            "acme",
            "--channel",
            "whatsapp",
            "--provider",
            "whatsapp_cloud",
            "--setting",
            "phone_number_id=106540352242922",
            "--setting",
            "rate_per_second=20",
            "--secret",
            "access_token=env:ACME_WA_TOKEN",
        ).stdout
        assert '"rate_per_second": 20' in out and '"access_token": "env:ACME_WA_TOKEN"' in out
        refused = run(
            url,
            "provider",
            "set",
            "--tenant",
            "acme",
            "--channel",
            "whatsapp",
            "--provider",
            "whatsapp_cloud",
            "--setting",
            "phone_number_id=106540352242922",
            "--secret",
            "access_token=EAAGsecret",
            check=False,
        )
        assert refused.returncode != 0 and "references" in refused.stderr and "EAAGsecret" not in refused.stderr
        assert '"provider": "whatsapp_cloud"' in run(url, "provider", "list", "--tenant", "acme").stdout
    finally:
        with psycopg.connect(pg_server.url(), autocommit=True) as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def run_without_url(*args: str, cwd: Path = ROOT, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("DISPATCHER_")}
    return subprocess.run(
        [sys.executable, "-m", "dispatcher", *args],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=check,
    )


@pytest.mark.slow
def test_without_database_url_the_cli_uses_the_running_dev_database(tmp_path: Path) -> None:
    """What `dispatcher dev` leaves in its data folder (an embedded server, the migrated `dispatcher` database, the
    dispatcher_app login) is found by every command in a fresh shell, without DATABASE_URL; once it stops, they say so."""
    data = tmp_path / "dev-data"
    pg = EmbeddedPostgres(data / "pgdata")
    try:
        owner_url = pg.ensure_database(cli.DEV_DATABASE)
        schema.migrate(owner_url)
        cli.ensure_app_login(owner_url)
        d = ("--data-dir", str(data))
        assert "queue empty" in run_without_url("status", *d).stdout
        assert '"slug": "acme"' in run_without_url("tenant", "create", "acme", *d).stdout
        assert re.search(r"^nd_\S+$", run_without_url("key", "create", "--tenant", "acme", *d).stdout, re.M)
        assert '"provider": "mock"' in run_without_url("provider", "list", "--tenant", "acme", *d).stdout
        assert "up to date" in run_without_url("migrate", *d).stdout
        # DISPATCHER_DATA_DIR, or ./.dispatcher in the working directory, instead of --data-dir
        assert "queue empty" in run_without_url("status", DISPATCHER_DATA_DIR=str(data)).stdout
        (tmp_path / "checkout").mkdir()
        (tmp_path / "checkout" / ".dispatcher").symlink_to(data)
        assert (
            json.loads(run_without_url("key", "list", "--tenant", "acme", cwd=tmp_path / "checkout").stdout)[0]["name"]
            == "default"
        )
        # psql: the wheel's own binary, on the dev database as its owner
        out = run_without_url("psql", *d, "-tA", "-c", "select current_user, count(*) from notify.tenants").stdout
        assert out.strip() == "postgres|1"
        # the app login is what production's is: no table access (row security and grants are met)
        with psycopg.connect(pg.url(cli.DEV_DATABASE, cli.DEV_APP_LOGIN)) as app:
            assert app.execute("select current_user").fetchone() == (cli.DEV_APP_LOGIN,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("select count(*) from notify.tenants")
    finally:
        pg.stop()
    stopped = run_without_url("status", *d, check=False)
    assert stopped.returncode != 0 and "is not running" in stopped.stderr and "dispatcher dev" in stopped.stderr
    assert len(stopped.stderr.strip().splitlines()) == 1
    nothing = run_without_url("status", "--data-dir", str(tmp_path / "none"), check=False)
    assert nothing.returncode != 0 and "DATABASE_URL is not set" in nothing.stderr and "Traceback" not in nothing.stderr


def test_psql_runs_on_database_url(pg_server: EmbeddedPostgres) -> None:
    done = run(pg_server.url(), "psql", "-tA", "-c", "select 1")
    assert done.stdout.strip() == "1"
    refused = run(pg_server.url(), "psql", "-v", "ON_ERROR_STOP=1", "-c", "select nope", check=False)
    assert refused.returncode != 0 and "nope" in refused.stderr


def fresh_database(pg_server: EmbeddedPostgres, name: str) -> str:
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    return pg_server.url(name)


def test_a_refused_migration_is_one_line_on_stderr(pg_server: EmbeddedPostgres, tmp_path: Path) -> None:
    """An edited landed migration (checksum mismatch), and a migration the database refuses: one line, exit 1."""
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT / "dispatcher", copy / "dispatcher", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "migrations", copy / "migrations")
    with (copy / "migrations" / "0002_notify_core.sql").open("a") as f:
        f.write("\n-- edited after landing\n")
    url = fresh_database(pg_server, "cli_refused")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    edited = subprocess.run(
        [sys.executable, "-m", "dispatcher", "migrate"],
        cwd=copy,
        env={**env, "DATABASE_URL": url},
        capture_output=True,
        text=True,
    )
    assert edited.returncode == 1, edited
    assert edited.stderr.strip() == "error: refusing to migrate: 0002_notify_core.sql: edited after landing", edited.stderr
    assert edited.stdout == ""

    with psycopg.connect(url, autocommit=True) as conn:  # 0001 creates procrastinate_jobs: make it fail
        conn.execute("create table public.procrastinate_jobs (id int)")
    failed = run(url, "migrate", check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert failed.stderr.startswith("error: migration 0001_procrastinate_3_10_0 failed and was rolled back: ")
    assert "already exists" in failed.stderr
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        admin.execute(sql.SQL("drop database {} with (force)").format(sql.Identifier("cli_refused")))
