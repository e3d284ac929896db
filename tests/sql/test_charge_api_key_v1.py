"""notify_api.charge_api_key_v1: takes one token from the key's bucket, or raises ND429 (the API's own statement)."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from api.routes.notifications import CHARGE


def test_each_call_takes_one_token_until_the_bucket_is_empty(db):
    key_id = uuid.uuid4()
    for _ in range(3):
        assert db.execute(CHARGE, (key_id, 3)).fetchone() == (True,)
    with pytest.raises(psycopg.Error) as err:
        db.execute(CHARGE, (key_id, 3))
    assert (err.value.sqlstate, err.value.diag.constraint_name) == ("ND429", "rate_limited")


def test_the_429_rolls_back_the_statement_it_ends(db):
    key_id = uuid.uuid4()
    db.execute(CHARGE, (key_id, 1))
    db.execute("create table charged (n int)")
    with pytest.raises(psycopg.Error):
        db.execute(
            "with w as (insert into charged values (1) returning n) select n, notify_api.charge_api_key_v1(%s, 1) from w",
            (key_id,),
        )
    assert db.execute("select count(*) from charged").fetchone()[0] == 0


def test_a_fast_keys_bucket_is_sharded(db):
    key_id = uuid.uuid4()
    for _ in range(200):
        db.execute(CHARGE, (key_id, 800))
    shards = db.execute("select count(*) from notify.rate_buckets where key like %s", (f"api:{key_id}:%",)).fetchone()[0]
    assert 1 < shards <= 16
