"""notify_api.get_recipient_v1: a recipient by ref; 404 if it does not exist for this tenant."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import call


def test_get_recipient_of_another_tenant_is_not_found(db, tenant):
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-1', '{}')", tenant)
    other = call(db, "notify_api.create_tenant_v1('other')")["id"]
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.get_recipient_v1(%s, 'runner-1')", other)
    assert info.value.sqlstate == "ND404"
