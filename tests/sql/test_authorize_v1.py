"""API key scopes, rotation with an overlap window, and per-key rate limits — all decided in Postgres."""

from __future__ import annotations

import time

import psycopg
import pytest

from dispatcher import keys
from tests.conftest import call

AUTHORIZE = "select tenant_id from notify_api.authorize_v1(%s, %s)"


def new_key(db, tenant, scopes=None):
    key = keys.generate()
    info = call(
        db,
        "notify_api.create_api_key_v1(%s, 'k', %s, %s, %s)",
        tenant,
        keys.display_prefix(key),
        keys.digest(key),
        scopes or ["submit", "read", "admin"],
    )
    return key, info


def test_a_key_is_allowed_only_its_scopes(db, tenant):
    key, info = new_key(db, tenant, ["read"])
    assert info["scopes"] == ["read"]
    assert db.execute(AUTHORIZE, (keys.digest(key), "read")).fetchone() is not None
    for scope in ("submit", "admin"):
        with pytest.raises(psycopg.Error) as err:
            db.execute(AUTHORIZE, (keys.digest(key), scope))
        assert (err.value.sqlstate, err.value.diag.constraint_name) == ("ND403", "insufficient_scope")


def test_a_fast_keys_bucket_is_sharded_so_requests_do_not_queue_on_one_row(db, tenant, connect):
    call(db, "notify_api.set_api_rate_v1(%s, 800)", tenant)  # 16 shards of 50/s
    key, info = new_key(db, tenant)
    key_id = info["id"]
    admitted = 0
    started = time.monotonic()
    for _ in range(900):  # a burst well over one second's worth
        try:
            db.execute(AUTHORIZE, (keys.digest(key), "read"))
            admitted += 1
        except psycopg.Error as err:
            assert err.sqlstate == "ND429"
    shards = db.execute("select count(*) from notify.rate_buckets where key like %s", (f"api:{key_id}:%",)).fetchone()[0]
    assert shards == 16
    elapsed = time.monotonic() - started
    assert 700 <= admitted <= 800 * (1 + elapsed) + 16, (admitted, elapsed)  # the burst plus the refill, no more
    # Two transactions authorizing the same key at once do not wait for each other (with 16 shards they usually
    # draw different rows; retried a few times so that a same-shard draw cannot fail the test).
    a, b = connect(), connect()
    for _ in range(5):
        db.execute(
            "update notify.rate_buckets set tokens = 50, updated_at = clock_timestamp() where key like %s", (f"api:{key_id}:%",)
        )
        a.execute(AUTHORIZE, (keys.digest(key), "read"))  # holds its shard's row until commit
        b.execute("set lock_timeout = '200ms'")
        try:
            b.execute(AUTHORIZE, (keys.digest(key), "read"))
            break
        except psycopg.errors.LockNotAvailable:
            b.rollback()
        finally:
            a.rollback()
    else:
        raise AssertionError("every second request waited for the first one's shard")
    b.rollback()
