"""notify_api.set_quiet_hours_v1, get_quiet_hours_v1, delete_quiet_hours_v1: replace, read back with the defaults,
remove; every error names its field."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call

DEFAULTS = {"timezone": "UTC", "start": None, "end": None, "categories": {}}


def test_nothing_set_is_the_default(db, tenant):
    got = call(db, "notify_api.get_quiet_hours_v1(%s)", tenant)
    assert got == {
        "timezone": None,
        "start": None,
        "end": None,
        "categories": {},
        "default": True,
        "defaults": DEFAULTS,
        "updated_at": None,
    }


def test_set_get_and_delete(db, tenant):
    body = {
        "timezone": "Europe/Madrid",
        "start": "21:00",
        "end": "08:00",
        "categories": {"reminder": {"start": "20:30", "end": "09:15"}, "password_reset": {"exempt": True}},
    }
    out = call(db, "notify_api.set_quiet_hours_v1(%s, %s)", tenant, Jsonb(body))
    assert {k: out[k] for k in body} == body and out["default"] is False and out["updated_at"]
    assert call(db, "notify_api.get_quiet_hours_v1(%s)", tenant) == out
    # A set replaces the previous one: what is left out is no longer set.
    out = call(
        db, "notify_api.set_quiet_hours_v1(%s, %s)", tenant, Jsonb({"categories": {"news": {"start": "22:00", "end": "07:00"}}})
    )
    assert (out["timezone"], out["start"], out["end"]) == (None, None, None)
    assert out["categories"] == {"news": {"start": "22:00", "end": "07:00"}}
    out = call(db, "notify_api.delete_quiet_hours_v1(%s)", tenant)
    assert out["default"] is True and out["categories"] == {}
    assert call(db, "(select count(*) from notify.quiet_hours)") == 0


@pytest.mark.parametrize(
    ("body", "status", "problem", "field"),
    [
        ([], "ND400", "invalid_type", ""),
        ({"start": "21:00"}, "ND400", "missing_field", "end"),
        ({"start": "25:00", "end": "08:00"}, "ND400", "invalid_format", "start"),
        ({"start": "9:00", "end": "08:00"}, "ND400", "invalid_format", "start"),
        ({"start": 21, "end": "08:00"}, "ND400", "invalid_type", "start"),
        ({"start": "08:00", "end": "08:00"}, "ND422", "invalid_quiet_hours", "end"),
        ({"timezone": "Mars/Olympus", "start": "21:00", "end": "08:00"}, "ND400", "invalid_timezone", "timezone"),
        ({"quiet": True}, "ND400", "unknown_field", "quiet"),
        ({"categories": []}, "ND400", "invalid_type", "categories"),
        ({"categories": {"reminder": {"start": "21:00"}}}, "ND400", "missing_field", "categories.reminder.end"),
        ({"categories": {"reminder": {"start": "21:00", "end": "8"}}}, "ND400", "invalid_format", "categories.reminder.end"),
        ({"categories": {"reminder": {"exempt": "yes"}}}, "ND400", "invalid_type", "categories.reminder.exempt"),
        (
            {"categories": {"reminder": {"exempt": True, "start": "21:00"}}},
            "ND422",
            "invalid_quiet_hours",
            "categories.reminder.exempt",
        ),
        ({"categories": {"reminder": {"from": "21:00"}}}, "ND400", "unknown_field", "categories.reminder.from"),
        ({"categories": {"reminder": "21:00"}}, "ND400", "invalid_type", "categories.reminder"),
    ],
)
def test_errors_name_the_field(db, tenant, body, status, problem, field):
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.set_quiet_hours_v1(%s, %s)", tenant, Jsonb(body))
    assert (info.value.sqlstate, info.value.diag.constraint_name, info.value.diag.column_name) == (status, problem, field)


def test_a_refused_set_changes_nothing(db, tenant):
    call(db, "notify_api.set_quiet_hours_v1(%s, %s)", tenant, Jsonb({"start": "21:00", "end": "08:00"}))
    with pytest.raises(psycopg.Error):
        call(db, "notify_api.set_quiet_hours_v1(%s, %s)", tenant, Jsonb({"start": "21:00", "end": "21:00"}))
    assert call(db, "notify_api.get_quiet_hours_v1(%s)", tenant)["start"] == "21:00"


def test_unknown_tenant_is_not_found(db):
    assert call(db, "notify_api.get_quiet_hours_v1(gen_random_uuid())") is None
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.set_quiet_hours_v1(gen_random_uuid(), %s)", Jsonb({"start": "21:00", "end": "08:00"}))
    assert (info.value.sqlstate, info.value.diag.column_name) == ("ND404", "tenant_id")
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.set_frequency_caps_v1(gen_random_uuid(), %s)", Jsonb({"caps": []}))
    assert (info.value.sqlstate, info.value.diag.column_name) == ("ND404", "tenant_id")
