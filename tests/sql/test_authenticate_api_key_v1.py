"""notify_api.authenticate_api_key_v1: the tenant and key id of an unrevoked, unexpired key, or no row."""

from __future__ import annotations

from dispatcher import keys
from tests.conftest import call
from tests.sql.test_create_api_key_v1 import AUTH


def test_last_used_is_recorded(db, tenant):
    key = keys.generate()
    call(db, "notify_api.create_api_key_v1(%s, 'ci', %s, %s)", tenant, keys.display_prefix(key), keys.digest(key))
    db.execute(AUTH, (keys.digest(key),))
    assert db.execute("select last_used_at is not null from notify.api_clients").fetchone()[0]
