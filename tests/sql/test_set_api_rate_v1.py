"""notify_api.set_api_rate_v1: how many requests per second each of a tenant's keys may make."""

from __future__ import annotations

import psycopg
import pytest

from dispatcher import keys
from tests.conftest import call
from tests.sql.test_authorize_v1 import AUTHORIZE, new_key


def test_each_key_is_held_to_its_tenants_rate(db, tenant):
    call(db, "notify_api.set_api_rate_v1(%s, 3)", tenant)
    a, _ = new_key(db, tenant)
    b, _ = new_key(db, tenant)
    for _ in range(3):
        db.execute(AUTHORIZE, (keys.digest(a), "read"))
    with pytest.raises(psycopg.Error) as err:
        db.execute(AUTHORIZE, (keys.digest(a), "read"))
    assert (err.value.sqlstate, err.value.diag.constraint_name) == ("ND429", "rate_limited")
    assert db.execute(AUTHORIZE, (keys.digest(b), "read")).fetchone() is not None  # another key has its own budget
    with pytest.raises(psycopg.Error):
        call(db, "notify_api.set_api_rate_v1(%s, 0)", tenant)
