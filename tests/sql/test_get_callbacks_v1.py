"""notify_api.get_callbacks_v1: a tenant's callback settings without the secret; 404 if none."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import call
from tests.sql.callbacks import URL, configure


def test_the_settings_are_shown_without_the_secret(db, tenant):
    configure(db, tenant)
    shown = call(db, "notify_api.get_callbacks_v1(%s)", tenant)
    assert shown["url"] == URL and "secret" not in shown and "previous_secret" not in shown


def test_none_configured_is_404(db, tenant):
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.get_callbacks_v1(%s)", tenant)
    assert err.value.sqlstate == "ND404" and err.value.diag.column_name == "callbacks"


def test_another_tenants_settings_are_not_seen(db, tenant):
    configure(db, tenant)
    other = str(call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"])
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.get_callbacks_v1(%s)", other)
    assert err.value.sqlstate == "ND404"
