"""notify_api.list_api_keys_v1: a tenant's keys, prefix only, never a hash."""

from __future__ import annotations

from dispatcher import keys
from tests.conftest import call


def new_key(db, tenant, name):
    key = keys.generate()
    call(db, "notify_api.create_api_key_v1(%s, %s, %s, %s)", tenant, name, keys.display_prefix(key), keys.digest(key))
    return key


def test_keys_are_listed_by_prefix_without_their_hash(db, tenant):
    key = new_key(db, tenant, "first")
    new_key(db, tenant, "second")
    listed = call(db, "notify_api.list_api_keys_v1(%s)", tenant)
    assert [k["name"] for k in listed] == ["first", "second"]
    assert listed[0]["prefix"] == keys.display_prefix(key)
    assert not any("hash" in name for k in listed for name in k) and keys.digest(key).hex() not in str(listed)


def test_another_tenants_keys_are_not_listed(db, tenant):
    new_key(db, tenant, "mine")
    other = str(call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"])
    assert call(db, "notify_api.list_api_keys_v1(%s)", other) == []
