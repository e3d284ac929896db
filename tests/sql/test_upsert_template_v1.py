"""notify_api.upsert_template_v1: the content of a template key for one locale; bad or oversized texts refused."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call


def test_templates_derive_their_variables_and_version_on_change(db, tenant):
    body = {
        "channels": {
            "email": {"subject": "Hi {{ name }}", "text": "{{event}} at {{time}}"},
            "whatsapp": {"name": "reminder", "language": "es", "parameters": ["name", "club"]},
        }
    }
    out = call(db, "notify_api.upsert_template_v1(%s, 'k', %s)", tenant, Jsonb(body))
    assert {t["channel"]: t["required_variables"] for t in out} == {
        "email": ["event", "name", "time"],
        "whatsapp": ["club", "name"],
    }
    assert {t["version"] for t in out} == {1}
    body["channels"]["email"]["text"] = "changed {{event}}"
    out = call(db, "notify_api.upsert_template_v1(%s, 'k', %s)", tenant, Jsonb(body))
    assert {t["channel"]: t["version"] for t in out} == {"email": 2, "whatsapp": 1}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "channels"),
        ({"channels": {"email": {"subject": "s"}}}, "channels.email.text"),
        ({"channels": {"email": {"subject": "s", "text": "t", "cc": "x"}}}, "channels.email.cc"),
        ({"channels": {"whatsapp": {"language": "es"}}}, "channels.whatsapp"),
        ({"channels": {"whatsapp": {"name": "n", "parameters": ["ok", "not ok"]}}}, "channels.whatsapp.parameters"),
        ({"channels": {"pigeon": {"text": "t"}}}, "channels.pigeon"),
        ({"locale": "??", "channels": {"sms": {"text": "t"}}}, "locale"),
    ],
)
def test_bad_templates_are_refused(db, tenant, body, field):
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.upsert_template_v1(%s, 'k', %s)", tenant, Jsonb(body))
    assert info.value.sqlstate == "ND400" and info.value.diag.column_name == field
