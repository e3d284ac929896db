"""dispatcher_client's provider failover chain, through the app in process (its test transport)."""

from __future__ import annotations

import pytest

from dispatcher_client import Client, DispatcherError
from tests.api.test_api import client, make_key  # noqa: F401  (fixture)
from tests.conftest import call


def test_the_client_sets_and_reads_a_chain(client, db, ready):  # noqa: F811
    call(db, "notify_api.set_provider_grants_v1(%s, 'TEST_', null, true)", ready)
    key, _ = make_key(db, ready)
    nd = Client("http://testserver", key, transport=client._transport)  # not closed: the test client owns the transport
    assert nd.get_channel_providers("email").chain == []
    relays = [
        {"provider": "smtp", "settings": {"host": "127.0.0.1", "port": 2525, "from_address": "club@example.com"}},
        {
            "provider": "smtp",
            "settings": {"host": "127.0.0.2", "from_address": "club@example.com"},
            "secrets": {"password": "env:TEST_SMTP_PASSWORD"},
        },
    ]
    out = nd.set_channel_providers("email", relays)
    assert out.provider == "smtp" and [(c.position, c.settings["host"]) for c in out.chain] == [
        (0, "127.0.0.1"),
        (1, "127.0.0.2"),
    ]
    assert out.chain[1].secrets == {"password": "env:TEST_SMTP_PASSWORD"} and out.chain[0].health.demoted is False
    assert nd.get_channel_providers("email") == out
    assert [p.chain for p in nd.list_channel_providers() if p.channel == "email"] == [out.chain]
    with pytest.raises(DispatcherError) as err:
        nd.set_channel_providers("email", [relays[0], {"provider": "smtp", "settings": {"host": "127.0.0.1"}}])
    assert (err.value.status, err.value.type, err.value.field) == (400, "missing_field", "providers[1].settings.from_address")
    assert nd.get_channel_providers("email") == out  # nothing half-written
    with pytest.raises(DispatcherError) as err:
        nd.set_channel_providers("email", [])
    assert err.value.status == 400
