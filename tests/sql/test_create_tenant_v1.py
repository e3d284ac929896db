"""notify_api.create_tenant_v1: creates a tenant; 409 if the slug is taken."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import call


def test_create_tenant_refuses_duplicates_and_bad_slugs(db):
    call(db, "notify_api.create_tenant_v1('acme')")
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.create_tenant_v1('acme')")
    assert info.value.sqlstate == "ND409"
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.create_tenant_v1('Not A Slug')")
    assert info.value.sqlstate == "ND422" and info.value.diag.column_name == "slug"
