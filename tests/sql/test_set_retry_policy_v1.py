"""notify_api.set_retry_policy_v1: how often and how fast transient failures are retried for a tenant."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import call


def test_the_policy_is_stored(db, tenant):
    call(db, "notify_api.set_retry_policy_v1(%s, 3, 100, 1000)", tenant)
    found = call(db, "notify_api.get_tenant_v1('acme')")
    assert (found["retry_max_attempts"], found["retry_base_ms"], found["retry_max_ms"]) == (3, 100, 1000)


@pytest.mark.parametrize("values", [(0, 100, 1000), (101, 100, 1000), (3, 0, 1000), (3, 1000, 100)])
def test_a_bad_policy_is_refused(db, tenant, values):
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.set_retry_policy_v1(%s, %s, %s, %s)", tenant, *values)
    assert (err.value.sqlstate, err.value.diag.constraint_name, err.value.diag.column_name) == (
        "ND422",
        "invalid_retry_policy",
        "retry",
    )


def test_an_unknown_tenant_is_404(db, tenant):
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.set_retry_policy_v1(null, 3, 100, 1000)")
    assert err.value.sqlstate == "ND404"
