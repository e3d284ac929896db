"""notify_api.check_api_key_v1: authenticates a key (no row: 401), checks its scope (ND403), refuses it (ND429) only
when its whole bucket is empty, and takes no token itself."""

from __future__ import annotations

import psycopg
import pytest

from dispatcher import keys
from tests.conftest import call

CHECK = "select tenant_id, api_key_id, rate_per_second from notify_api.check_api_key_v1(%s, %s)"


def new_key(db, tenant, scopes):
    key = keys.generate()
    info = call(
        db, "notify_api.create_api_key_v1(%s, 'k', %s, %s, %s)", tenant, keys.display_prefix(key), keys.digest(key), scopes
    )
    return key, info


def test_a_valid_key_returns_its_tenant_key_and_rate(db, tenant):
    call(db, "notify_api.set_api_rate_v1(%s, 7)", tenant)
    key, info = new_key(db, tenant, ["read"])
    row = db.execute(CHECK, (keys.digest(key), "read")).fetchone()
    assert (str(row[0]), str(row[1]), row[2]) == (tenant, info["id"], 7)


def test_an_unknown_or_revoked_key_returns_no_row(db, tenant):
    assert db.execute(CHECK, (keys.digest(keys.generate()), "read")).fetchone() is None
    key, info = new_key(db, tenant, ["read"])
    call(db, "notify_api.revoke_api_key_v1(%s, %s)", tenant, info["id"])
    assert db.execute(CHECK, (keys.digest(key), "read")).fetchone() is None


def test_a_missing_scope_is_403(db, tenant):
    key, _ = new_key(db, tenant, ["read"])
    with pytest.raises(psycopg.Error) as err:
        db.execute(CHECK, (keys.digest(key), "submit"))
    assert (err.value.sqlstate, err.value.diag.constraint_name) == ("ND403", "insufficient_scope")


def test_it_takes_no_token(db, tenant):
    call(db, "notify_api.set_api_rate_v1(%s, 2)", tenant)
    key, _ = new_key(db, tenant, ["read"])
    for _ in range(10):
        assert db.execute(CHECK, (keys.digest(key), "read")).fetchone() is not None
    assert db.execute("select count(*) from notify.rate_buckets").fetchone()[0] == 0


def test_an_empty_bucket_is_429(db, tenant):
    call(db, "notify_api.set_api_rate_v1(%s, 2)", tenant)
    key, info = new_key(db, tenant, ["read"])
    db.execute(
        "insert into notify.rate_buckets (key, tokens, updated_at) values (%s, 0, clock_timestamp() + interval '1 hour')",
        (f"api:{info['id']}:0",),
    )
    with pytest.raises(psycopg.Error) as err:
        db.execute(CHECK, (keys.digest(key), "read"))
    assert (err.value.sqlstate, err.value.diag.constraint_name) == ("ND429", "rate_limited")
