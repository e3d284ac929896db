"""providers/base.py: the correlation id a provider carries for us, written and parsed in one place."""

from __future__ import annotations

import uuid

import pytest

from providers.base import Message, parse_correlation_id


def test_what_a_message_writes_parses_back():
    tenant, delivery = uuid.uuid4(), uuid.uuid4()
    message = Message(tenant_id=tenant, delivery_id=delivery, attempt=1, channel="email", address="a@example.com", rendered={})
    assert parse_correlation_id(message.correlation_id) == (tenant, delivery)


@pytest.mark.parametrize(
    "value",
    [None, "", 42, ["a", "b"], "not-a-uuid:also-not", f"{uuid.uuid4()}", f"{uuid.uuid4()}:{uuid.uuid4()}:x", f"{uuid.uuid4()}:"],
)
def test_anything_else_is_no_match(value):
    assert parse_correlation_id(value) == (None, None)
