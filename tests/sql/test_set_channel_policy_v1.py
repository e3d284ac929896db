"""notify_api.set_channel_policy_v1: whether a channel is opt_in or opt_out for a tenant."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import call, intent, submit


def test_the_policy_is_set_and_replaced(db, tenant):
    assert call(db, "notify_api.set_channel_policy_v1(%s, 'email', 'opt_in')", tenant)["policy"] == "opt_in"
    assert call(db, "notify_api.set_channel_policy_v1(%s, 'email', 'opt_out')", tenant)["policy"] == "opt_out"
    assert db.execute("select count(*) from notify.channel_policies where tenant_id = %s", (tenant,)).fetchone()[0] == 1


def test_submissions_follow_it(db, ready):
    call(db, "notify_api.set_channel_policy_v1(%s, 'email', 'opt_in')", ready)
    response, _ = submit(db, ready, intent(channels=["email"]))
    assert response["deliveries"][0]["status"] == "suppressed"


def test_another_tenant_keeps_its_default(db, tenant):
    other = str(call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"])
    call(db, "notify_api.set_channel_policy_v1(%s, 'email', 'opt_in')", tenant)
    policies = {p["channel"]: p["policy"] for p in call(db, "notify_api.list_channel_policies_v1(%s)", other)}
    assert policies["email"] == "opt_out"


def test_an_unknown_policy_is_refused(db, tenant):
    with pytest.raises(psycopg.Error):
        call(db, "notify_api.set_channel_policy_v1(%s, 'email', 'maybe')", tenant)
