"""notify_api.list_channel_providers_v1: the provider of every channel, settings merged over defaults, secret references."""

from __future__ import annotations

from tests.conftest import call
from tests.sql.test_set_channel_provider_v1 import WA, set_provider


def test_settings_merge_over_defaults_and_secret_references_are_shown(db, tenant):
    out = set_provider(db, tenant, "whatsapp", WA)
    assert out["provider"] == "whatsapp_cloud" and out["settings"]["rate_per_second"] == 20
    assert out["settings"]["api_version"] == "v22.0" and "STOP" in out["settings"]["opt_out_keywords"]
    assert out["secrets"] == {"access_token": "env:TEST_WA_TOKEN"}  # the variable's name, never its value
    listed = {p["channel"]: p for p in call(db, "notify_api.list_channel_providers_v1(%s)", tenant)}
    assert listed["email"]["provider"] == "mock" and listed["email"]["default"] is True
