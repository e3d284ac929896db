"""notify_api.set_retention_v1 / get_retention_v1: a tenant's retention periods, per channel, with errors naming the field."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call


def test_defaults_until_set(db, tenant):
    got = call(db, "notify_api.get_retention_v1(%s)", tenant)
    assert (got["content_days"], got["history_days"], got["default"]) == (30, 90, True)
    assert got["defaults"] == {"content_days": 30, "history_days": 90}
    assert got["channels"]["whatsapp"] == {"content_days": 30, "history_days": 90, "override": False}


def test_set_with_a_channel_override_and_read_back(db, tenant):
    body = {"content_days": 14, "history_days": 400, "channels": {"whatsapp": {"content_days": 7}, "sms": {"history_days": 60}}}
    got = call(db, "notify_api.set_retention_v1(%s, %s)", tenant, Jsonb(body))
    assert (got["content_days"], got["history_days"], got["default"]) == (14, 400, False)
    assert got["channels"]["whatsapp"] == {"content_days": 7, "history_days": 400, "override": True}
    assert got["channels"]["sms"] == {"content_days": 14, "history_days": 60, "override": True}
    assert got["channels"]["email"] == {"content_days": 14, "history_days": 400, "override": False}
    assert call(db, "notify_api.get_retention_v1(%s)", tenant) == got
    # A second call replaces the settings: what it leaves out takes the defaults again.
    again = call(db, "notify_api.set_retention_v1(%s, %s)", tenant, Jsonb({"content_days": 10}))
    assert (again["content_days"], again["history_days"]) == (10, 90)
    assert not any(c["override"] for c in again["channels"].values())


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"content_days": 0}, "content_days", "invalid_retention"),
        ({"content_days": 3651, "history_days": 3651}, "content_days", "invalid_retention"),
        ({"content_days": "7"}, "content_days", "invalid_type"),
        ({"content_days": 1.5}, "content_days", "invalid_type"),
        ({"content_days": 40, "history_days": 30}, "history_days", "invalid_retention"),
        ({"keep": 3}, "keep", "unknown_field"),
        ({"channels": {"pigeon": {"content_days": 3}}}, "channels.pigeon", "unknown_field"),
        ({"channels": {"email": {"content_days": 3, "days": 1}}}, "channels.email.days", "unknown_field"),
        ({"channels": {"email": {}}}, "channels.email", "invalid_type"),
        ({"channels": {"email": {"content_days": -1}}}, "channels.email.content_days", "invalid_retention"),
        ({"history_days": 60, "channels": {"sms": {"content_days": 61}}}, "channels.sms.history_days", "invalid_retention"),
    ],
)
def test_bad_settings_name_the_field(db, tenant, body, field, problem):
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.set_retention_v1(%s, %s)", tenant, Jsonb(body))
    assert (err.value.diag.column_name, err.value.diag.constraint_name) == (field, problem)
    assert err.value.sqlstate == ("ND422" if problem == "invalid_retention" else "ND400")
    assert call(db, "notify_api.get_retention_v1(%s)", tenant)["default"] is True  # nothing written
