"""notify_api.get_tenant_v1: a tenant by slug, or null; null too for a tenant the session's login is not bound to."""

from __future__ import annotations

import psycopg

from tests.conftest import app_url, call


def test_a_tenant_is_found_by_its_slug(db, tenant):
    found = call(db, "notify_api.get_tenant_v1('acme')")
    assert found["id"] == tenant and found["slug"] == "acme" and found["default_locale"] == "en"


def test_an_unknown_slug_is_null(db, tenant):
    assert call(db, "notify_api.get_tenant_v1('nobody')") is None


def test_a_login_bound_to_other_tenants_gets_null(db, db_url, tenant):
    other = str(call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"])
    url = app_url(db_url, "dispatcher_caller")
    db.execute("insert into notify.login_tenants (login, tenant_ids) values ('dispatcher_caller', array[%s::uuid])", (other,))
    with psycopg.connect(url, autocommit=True) as caller:
        assert call(caller, "notify_api.get_tenant_v1('acme')") is None
        assert call(caller, "notify_api.get_tenant_v1('other')")["id"] == other
