"""notify_api.set_frequency_caps_v1, get_frequency_caps_v1, delete_frequency_caps_v1: replace, read back with the
defaults, remove; every error names its field."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call


def test_nothing_set_is_the_default(db, tenant):
    assert call(db, "notify_api.get_frequency_caps_v1(%s)", tenant) == {
        "caps": [],
        "default": True,
        "defaults": {"caps": [], "action": "suppress"},
        "updated_at": None,
    }


def test_set_get_and_delete(db, tenant):
    caps = [
        {"max": 3, "period": "P1D", "category": "reminder"},
        {"max": 1, "period": "PT10M", "channel": "whatsapp", "action": "hold"},
        {"max": 20, "period": "P1W"},
    ]
    out = call(db, "notify_api.set_frequency_caps_v1(%s, %s)", tenant, Jsonb({"caps": caps}))
    assert out["caps"] == [
        {"max": 3, "period": "P1D", "channel": None, "category": "reminder", "action": "suppress"},
        {"max": 1, "period": "PT10M", "channel": "whatsapp", "category": None, "action": "hold"},
        {"max": 20, "period": "P7D", "channel": None, "category": None, "action": "suppress"},
    ]
    assert out["default"] is False and call(db, "notify_api.get_frequency_caps_v1(%s)", tenant) == out
    out = call(db, "notify_api.set_frequency_caps_v1(%s, %s)", tenant, Jsonb({"caps": [{"max": 2, "period": "P1DT12H"}]}))
    assert [c["period"] for c in out["caps"]] == ["P1DT12H"]
    assert call(db, "notify_api.delete_frequency_caps_v1(%s)", tenant)["default"] is True
    assert call(db, "notify_api.set_frequency_caps_v1(%s, %s)", tenant, Jsonb({"caps": []}))["caps"] == []


@pytest.mark.parametrize(
    ("body", "status", "problem", "field"),
    [
        ({}, "ND400", "missing_field", "caps"),
        ({"caps": {}}, "ND400", "invalid_type", "caps"),
        ({"caps": [1]}, "ND400", "invalid_type", "caps[0]"),
        ({"caps": [{"period": "P1D"}]}, "ND400", "missing_field", "caps[0].max"),
        ({"caps": [{"max": 1.5, "period": "P1D"}]}, "ND400", "invalid_type", "caps[0].max"),
        ({"caps": [{"max": 0, "period": "P1D"}]}, "ND422", "invalid_frequency_cap", "caps[0].max"),
        ({"caps": [{"max": 1}]}, "ND400", "missing_field", "caps[0].period"),
        ({"caps": [{"max": 1, "period": "1 day"}]}, "ND400", "invalid_format", "caps[0].period"),
        ({"caps": [{"max": 1, "period": "P1M"}]}, "ND400", "invalid_format", "caps[0].period"),
        ({"caps": [{"max": 1, "period": "P"}]}, "ND400", "invalid_format", "caps[0].period"),
        ({"caps": [{"max": 1, "period": "P32D"}]}, "ND422", "invalid_frequency_cap", "caps[0].period"),
        ({"caps": [{"max": 1, "period": "PT0S"}]}, "ND422", "invalid_frequency_cap", "caps[0].period"),
        # Too long for an interval: refused as out of range, not Postgres's own data error (no field).
        ({"caps": [{"max": 1, "period": "P99999999999999999999999D"}]}, "ND422", "invalid_frequency_cap", "caps[0].period"),
        ({"caps": [{"max": 1, "period": "P9999999999W"}]}, "ND422", "invalid_frequency_cap", "caps[0].period"),
        ({"caps": [{"max": 1, "period": "PT999999999999H"}]}, "ND422", "invalid_frequency_cap", "caps[0].period"),
        ({"caps": [{"max": 1, "period": "P1D", "channel": "fax"}]}, "ND400", "invalid_channel", "caps[0].channel"),
        ({"caps": [{"max": 1, "period": "P1D", "action": "drop"}]}, "ND400", "invalid_value", "caps[0].action"),
        ({"caps": [{"max": 1, "period": "P1D", "per": "x"}]}, "ND400", "unknown_field", "caps[0].per"),
        (
            {"caps": [{"max": 1, "period": "P1D"}, {"max": 2, "period": "PT24H"}]},
            "ND422",
            "invalid_frequency_cap",
            "caps[1]",
        ),
        ({"caps": [{"max": 1, "period": f"PT{i + 1}M"} for i in range(21)]}, "ND422", "invalid_frequency_cap", "caps"),
    ],
)
def test_errors_name_the_field(db, tenant, body, status, problem, field):
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.set_frequency_caps_v1(%s, %s)", tenant, Jsonb(body))
    assert (info.value.sqlstate, info.value.diag.constraint_name, info.value.diag.column_name) == (status, problem, field)


@pytest.mark.parametrize(
    "text", ["PT15M", "P1D", "P1W", "PT1H30M", "PT1.5S", "PT2,5S", "P1DT", "PT", "P", "P1M", "P1Y", "1 day", "pt1h"]
)
def test_a_cap_period_and_a_route_within_read_durations_alike(db, tenant, text):
    # One parser (notify._parse_iso_duration) behind both: what one accepts the other accepts, as the same interval.
    parsed = db.execute("select notify._parse_iso_duration(%s)", (text,)).fetchone()[0]
    try:
        out = call(db, "notify_api.set_frequency_caps_v1(%s, %s)", tenant, Jsonb({"caps": [{"max": 1, "period": text}]}))
        cap = db.execute("select period from notify.frequency_caps where tenant_id = %s", (tenant,)).fetchone()[0]
    except psycopg.Error as exc:
        assert exc.diag.constraint_name == "invalid_format"
        cap = out = None
    try:
        within = db.execute("select notify._duration_field(%s, 'route[0].within')", (Jsonb(text),)).fetchone()[0]
    except psycopg.Error as exc:
        assert exc.diag.constraint_name == "invalid_duration"
        within = None
    assert cap == within == parsed
    assert (out is None) == (parsed is None)
