"""The `dispatcher` CLI against a test database: migrate, tenant create, key create/list/revoke."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import psycopg
from psycopg import sql

from dispatcher import keys
from tests.conftest import ROOT


def run(url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run([sys.executable, "-m", "dispatcher", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=check)


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
            assert conn.execute("select tenant_id from notify_api.authenticate_api_key_v1(%s)", (keys.digest(key),)).fetchone() is None
            assert conn.execute("select tenant_id from notify_api.authenticate_api_key_v1(%s)", (keys.digest(new_key),)).fetchone()
        reader = run(url, "key", "create", "--tenant", "acme", "--scope", "read").stdout
        assert "scopes read)" in reader
        key = re.search(r"^(nd_\S+)$", run(url, "key", "create", "--tenant", "acme").stdout, re.M).group(1)  # type: ignore[union-attr]
        listed = json.loads(run(url, "key", "list", "--tenant", "acme").stdout)
        key_id = [k["id"] for k in listed if k["revoked_at"] is None and k["expires_at"] is None][-1]   # the one just made
        run(url, "key", "revoke", "--tenant", "acme", key_id)
        with psycopg.connect(url) as conn:
            assert conn.execute("select tenant_id from notify_api.authenticate_api_key_v1(%s)", (keys.digest(key),)).fetchone() is None
        assert "no tenant" in run(url, "key", "create", "--tenant", "nobody", check=False).stderr
        ungranted = run(url, "provider", "set", "--tenant", "acme", "--channel", "whatsapp", "--provider", "whatsapp_cloud",
                        "--setting", "phone_number_id=106540352242922", "--secret", "access_token=env:ACME_WA_TOKEN", check=False)
        assert ungranted.returncode != 0 and "namespace" in ungranted.stderr
        granted = json.loads(run(url, "tenant", "secrets", "--tenant", "acme", "--env-prefix", "ACME_").stdout)
        assert granted["env_prefix"] == "ACME_" and granted["private_endpoints"] is False
        granted = json.loads(run(url, "tenant", "secrets", "--tenant", "acme", "--file-dir", "/run/secrets/acme/").stdout)
        assert (granted["env_prefix"], granted["file_dir"]) == ("ACME_", "/run/secrets/acme/")   # options left out are kept
        out = run(url, "provider", "set", "--tenant", "acme", "--channel", "whatsapp", "--provider", "whatsapp_cloud",
                  "--setting", "phone_number_id=106540352242922", "--setting", "rate_per_second=20",
                  "--secret", "access_token=env:ACME_WA_TOKEN").stdout
        assert '"rate_per_second": 20' in out and '"access_token": "env:ACME_WA_TOKEN"' in out
        refused = run(url, "provider", "set", "--tenant", "acme", "--channel", "whatsapp", "--provider", "whatsapp_cloud",
                      "--setting", "phone_number_id=106540352242922", "--secret", "access_token=EAAGsecret", check=False)
        assert refused.returncode != 0 and "references" in refused.stderr and "EAAGsecret" not in refused.stderr
        assert '"provider": "whatsapp_cloud"' in run(url, "provider", "list", "--tenant", "acme").stdout
    finally:
        with psycopg.connect(pg_server.url(), autocommit=True) as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
