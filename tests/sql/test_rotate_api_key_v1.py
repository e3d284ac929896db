"""notify_api.rotate_api_key_v1: a new key of the same name and scopes; the old one works for the overlap window."""

from __future__ import annotations

import psycopg
import pytest

from dispatcher import keys
from tests.conftest import call
from tests.sql.test_authorize_v1 import AUTHORIZE, new_key


def test_rotation_keeps_the_old_key_for_the_overlap_window(db, tenant):
    old, info = new_key(db, tenant, ["submit"])
    fresh = keys.generate()
    out = call(
        db,
        "notify_api.rotate_api_key_v1(%s, %s, %s, %s, 3600)",
        tenant,
        info["id"],
        keys.display_prefix(fresh),
        keys.digest(fresh),
    )
    assert out["replaces"] == info["id"] and out["scopes"] == ["submit"]
    assert db.execute(AUTHORIZE, (keys.digest(old), "submit")).fetchone() is not None
    assert db.execute(AUTHORIZE, (keys.digest(fresh), "submit")).fetchone() is not None
    db.execute("update notify.api_clients set expires_at = now() - interval '1 second' where id = %s", (info["id"],))
    assert db.execute(AUTHORIZE, (keys.digest(old), "submit")).fetchone() is None
    assert db.execute("select tenant_id from notify_api.authenticate_api_key_v1(%s)", (keys.digest(old),)).fetchone() is None
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.rotate_api_key_v1(%s, %s, %s, %s, 0)", tenant, info["id"], "p", keys.digest(keys.generate()))
    assert err.value.sqlstate == "ND404"
