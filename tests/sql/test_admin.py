"""Tenants and API keys: hashes only, revocation at once, last-used time."""

from __future__ import annotations

from uuid import UUID

import psycopg
import pytest

from dispatcher import keys
from tests.conftest import call

AUTH = "select tenant_id, api_key_id from notify_api.authenticate_api_key_v1(%s)"


def test_create_tenant_refuses_duplicates_and_bad_slugs(db):
    call(db, "notify_api.create_tenant_v1('acme')")
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.create_tenant_v1('acme')")
    assert info.value.sqlstate == "ND409"
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.create_tenant_v1('Not A Slug')")
    assert info.value.sqlstate == "ND422" and info.value.diag.column_name == "slug"


def test_keys_are_stored_as_hashes_and_authenticate(db, tenant):
    key = keys.generate()
    info = call(db, "notify_api.create_api_key_v1(%s, 'ci', %s, %s)", tenant, keys.display_prefix(key), keys.digest(key))
    stored = db.execute("select key_hash, prefix from notify.api_clients").fetchone()
    assert stored[0] == keys.digest(key) and key.encode() not in bytes(stored[0]) and key not in stored[1]
    assert db.execute("select count(*) from notify.api_clients where key_hash::text like %s", (f"%{key}%",)).fetchone()[0] == 0
    assert db.execute(AUTH, (keys.digest(key),)).fetchone() == (UUID(tenant), UUID(info["id"]))
    assert db.execute(AUTH, (keys.digest(key + "x"),)).fetchone() is None


def test_revoked_keys_stop_working_at_once(db, tenant):
    key = keys.generate()
    info = call(db, "notify_api.create_api_key_v1(%s, 'ci', %s, %s)", tenant, keys.display_prefix(key), keys.digest(key))
    call(db, "notify_api.revoke_api_key_v1(%s, %s)", tenant, info["id"])
    assert db.execute(AUTH, (keys.digest(key),)).fetchone() is None
    listed = call(db, "notify_api.list_api_keys_v1(%s)", tenant)
    assert listed[0]["revoked_at"] is not None and "key_hash" not in listed[0]


def test_a_key_cannot_be_revoked_through_another_tenant(db, tenant):
    key = keys.generate()
    info = call(db, "notify_api.create_api_key_v1(%s, 'ci', %s, %s)", tenant, keys.display_prefix(key), keys.digest(key))
    other = call(db, "notify_api.create_tenant_v1('other')")["id"]
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.revoke_api_key_v1(%s, %s)", other, info["id"])
    assert err.value.sqlstate == "ND404"
    assert db.execute(AUTH, (keys.digest(key),)).fetchone() is not None


def test_last_used_is_recorded(db, tenant):
    key = keys.generate()
    call(db, "notify_api.create_api_key_v1(%s, 'ci', %s, %s)", tenant, keys.display_prefix(key), keys.digest(key))
    db.execute(AUTH, (keys.digest(key),))
    assert db.execute("select last_used_at is not null from notify.api_clients").fetchone()[0]


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
