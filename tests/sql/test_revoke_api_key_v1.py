"""notify_api.revoke_api_key_v1: a key revoked at once; later requests with it get 401."""

from __future__ import annotations

import psycopg
import pytest

from dispatcher import keys
from tests.conftest import call
from tests.sql.test_create_api_key_v1 import AUTH


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
