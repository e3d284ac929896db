"""notify_api.set_callbacks_v1: creates or updates a tenant's callbacks; the secret is used and shown only on creation."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from providers.standard_webhooks import new_secret
from tests.conftest import call
from tests.sql.callbacks import URL, configure


def test_creating_shows_the_secret_and_the_default_schedule(db, tenant):
    created = configure(db, tenant)
    assert created["url"] == URL and created["enabled"] is True and created["secret"].startswith("whsec_")
    assert sum(created["retry_schedule_ms"]) >= 86_400_000


def test_updating_keeps_the_secret_and_does_not_show_it(db, tenant):
    created = configure(db, tenant)
    updated = call(
        db,
        "notify_api.set_callbacks_v1(%s, %s, %s)",
        tenant,
        Jsonb({"enabled": False, "retry_schedule_ms": [0, 1000]}),
        new_secret(),
    )
    assert "secret" not in updated and updated["enabled"] is False and updated["retry_schedule_ms"] == [0, 1000]
    assert updated["url"] == URL  # not named: unchanged
    assert db.execute("select secret from notify.callback_endpoints").fetchone()[0] == created["secret"]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ([], "ND400", ""),
        ({"url": "ftp://x.example/"}, "ND400", "url"),
        ({"url": "https://user:pw@x.example/"}, "ND400", "url"),
        ({"retry_schedule_ms": "soon"}, "ND400", "retry_schedule_ms"),
        ({"retry_schedule_ms": []}, "ND422", "retry_schedule_ms"),
        ({"retry_schedule_ms": [86_400_001]}, "ND422", "retry_schedule_ms"),
        ({"enabled": "yes"}, "ND400", "enabled"),
        ({"surprise": 1}, "ND400", "surprise"),
    ],
)
def test_bad_bodies_are_refused_naming_the_field(db, tenant, body, status, field):
    with pytest.raises(psycopg.Error) as err:
        configure(db, tenant, body)
    assert err.value.sqlstate == status and (err.value.diag.column_name or "") == field


def test_a_secret_that_is_not_whsec_is_refused(db, tenant):
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.set_callbacks_v1(%s, %s, 'plain')", tenant, Jsonb({"url": URL}))
    assert err.value.sqlstate == "ND422" and err.value.diag.column_name == "secret"
