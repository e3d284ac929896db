"""notify_api.list_templates_v1: a tenant's templates with the variables each needs."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from tests.conftest import call


def test_templates_are_listed_per_tenant(db, tenant):
    call(db, "notify_api.upsert_template_v1(%s, 'a', %s)", tenant, Jsonb({"channels": {"sms": {"text": "t"}}}))
    other = call(db, "notify_api.create_tenant_v1('other')")["id"]
    assert [t["key"] for t in call(db, "notify_api.list_templates_v1(%s)", tenant)] == ["a"]
    assert call(db, "notify_api.list_templates_v1(%s)", other) == []
