"""notify_api.list_channel_policies_v1: the consent policy in force for each channel."""

from __future__ import annotations

from tests.conftest import call


def test_channel_policies_list_defaults_and_changes(db, tenant):
    call(db, "notify_api.set_channel_policy_v1(%s, 'sms', 'opt_out')", tenant)
    policies = {p["channel"]: (p["policy"], p["default"]) for p in call(db, "notify_api.list_channel_policies_v1(%s)", tenant)}
    assert policies == {"whatsapp": ("opt_in", True), "email": ("opt_out", True), "sms": ("opt_out", False)}
