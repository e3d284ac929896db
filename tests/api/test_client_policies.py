"""dispatcher_client's quiet hours and frequency caps, through the app in process (its test transport)."""

from __future__ import annotations

import pytest

from dispatcher_client import Client, DispatcherError, FrequencyCap, QuietWindow
from tests.api.test_api import client, make_key  # noqa: F401  (fixture)
from tests.conftest import call


def test_the_client_sets_reads_and_removes_the_policies(client, db, ready):  # noqa: F811
    key, _ = make_key(db, ready)
    nd = Client("http://testserver", key, transport=client._transport)  # not closed: the test client owns the transport
    assert nd.get_quiet_hours().default is True and nd.get_frequency_caps().caps == []
    quiet = nd.set_quiet_hours(
        start="21:00", end="08:00", timezone="Europe/Madrid", categories={"password_reset": QuietWindow(exempt=True)}
    )
    assert (quiet.start, quiet.end, quiet.timezone, quiet.default) == ("21:00", "08:00", "Europe/Madrid", False)
    assert quiet.categories == {"password_reset": QuietWindow(exempt=True)}
    assert nd.get_quiet_hours() == quiet
    caps = nd.set_frequency_caps([FrequencyCap(max=3, period="P1D", category="reminder"), {"max": 1, "period": "PT6S"}])
    assert [(c.max, c.period, c.category, c.action) for c in caps.caps] == [
        (3, "P1D", "reminder", "suppress"),
        (1, "PT6S", None, "suppress"),
    ]
    assert call(db, "notify_api.get_frequency_caps_v1(%s)", ready)["caps"][0]["max"] == 3
    with pytest.raises(DispatcherError) as err:
        nd.set_frequency_caps([FrequencyCap(max=3, period="P2M")])
    assert (err.value.status, err.value.type, err.value.field) == (400, "invalid_format", "caps[0].period")
    assert nd.delete_quiet_hours().default is True and nd.delete_frequency_caps().default is True
