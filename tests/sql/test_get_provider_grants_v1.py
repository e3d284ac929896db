"""notify_api.get_provider_grants_v1: the operator's grant to a tenant, read-only: {env_prefix, file_dir, private_endpoints}."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import call


def test_without_a_grant_nothing_is_granted(db, tenant):
    assert call(db, "notify_api.get_provider_grants_v1(%s)", tenant) == {
        "env_prefix": None,
        "file_dir": None,
        "private_endpoints": False,
    }


def test_the_grant_the_operator_set_is_shown(db, tenant):
    call(db, "notify_api.set_provider_grants_v1(%s, 'ACME_', '/run/secrets/acme/', true)", tenant)
    assert call(db, "notify_api.get_provider_grants_v1(%s)", tenant) == {
        "env_prefix": "ACME_",
        "file_dir": "/run/secrets/acme/",
        "private_endpoints": True,
    }


def test_no_tenant_is_not_found(db, tenant):
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.get_provider_grants_v1(null)")
    assert err.value.sqlstate == "ND404"
