"""Tenants and API keys: hashes only, revocation at once, last-used time."""

from __future__ import annotations

from uuid import UUID

import psycopg
import pytest

from dispatcher import keys
from tests.conftest import call
from tests.sql.test_authorize_v1 import new_key

AUTH = "select tenant_id, api_key_id from notify_api.authenticate_api_key_v1(%s)"


def test_keys_are_stored_as_hashes_and_authenticate(db, tenant):
    key = keys.generate()
    info = call(db, "notify_api.create_api_key_v1(%s, 'ci', %s, %s)", tenant, keys.display_prefix(key), keys.digest(key))
    stored = db.execute("select key_hash, prefix from notify.api_clients").fetchone()
    assert stored[0] == keys.digest(key) and key.encode() not in bytes(stored[0]) and key not in stored[1]
    assert db.execute("select count(*) from notify.api_clients where key_hash::text like %s", (f"%{key}%",)).fetchone()[0] == 0
    assert db.execute(AUTH, (keys.digest(key),)).fetchone() == (UUID(tenant), UUID(info["id"]))
    assert db.execute(AUTH, (keys.digest(key + "x"),)).fetchone() is None


def test_a_hash_must_be_sha256(db, tenant):
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.create_api_key_v1(%s, 'ci', 'p', %s)", tenant, b"short")
    assert info.value.sqlstate == "ND422"


def test_callers_role_can_submit_but_not_touch_tables_or_keys(db, ready):
    db.execute("set role notify_caller")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            db.execute("select * from notify.notification_requests")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            call(db, "notify_api.create_api_key_v1(%s, 'x', 'p', %s)", ready, b"0" * 32)
    finally:
        db.execute("reset role")


def test_scopes_are_checked(db, tenant):
    with pytest.raises(psycopg.Error) as err:
        new_key(db, tenant, ["superuser"])
    assert err.value.sqlstate == "ND422" and err.value.diag.column_name == "scopes"
