"""`dispatcher notifications find|show`, `deliveries resolve`, `recipients export|erase`: the support questions without
SQL, run in process against the suite's database as the application login."""

from __future__ import annotations

import json

import pytest
from psycopg.types.json import Jsonb

from cli.commands import main
from tests.conftest import app_url, call, claim, intent, record, result, submit
from tests.sql.test_state_machine import INGEST


@pytest.fixture
def cli(db, db_url, ready, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", app_url(db_url))

    def run(*argv: str) -> str:
        main(list(argv))
        return capsys.readouterr().out

    return run


def test_find_and_show_a_notification_with_its_timeline(cli, db, ready):
    first, _ = submit(db, ready, intent(channels=["email"]), key="order-7")
    second, _ = submit(db, ready, intent(channels=["email", "whatsapp"], metadata={"order": "8"}))
    [row] = [r for r in claim(db, "email") if str(r[1]) == first["deliveries"][0]["id"]]
    record(db, result(row, "sent", provider_message_id="pm-1"))
    out = cli("notifications", "find", "--tenant", "acme", "--recipient", "runner-42")
    lines = out.splitlines()
    assert lines[0].split() == ["created", "id", "recipient", "template", "deliveries"]
    assert second["id"] in lines[1] and first["id"] in lines[2] and "email:sent" in lines[2]
    assert first["id"] in cli("notifications", "find", "--tenant", "acme", "--idempotency-key", "order-7")
    only = cli("notifications", "find", "--tenant", "acme", "--metadata", "order=8", "--json")
    assert [n["id"] for n in json.loads(only)["items"]] == [second["id"]]
    assert "more: --cursor" in cli("notifications", "find", "--tenant", "acme", "--limit", "1")

    db.execute(INGEST, ("mock", "cli-1", Jsonb({}), Jsonb([{"provider_message_id": "pm-1", "status": "delivered"}])))
    shown = cli("notifications", "show", "--tenant", "acme", first["id"])
    assert f"notification {first['id']}" in shown and "idempotency key  order-7" in shown
    timeline = shown.split("\n\n", 1)[1].splitlines()
    assert timeline[0].split() == ["at", "channel", "recipient", "event", "detail"]
    events = [" ".join(line.split()[2:]) for line in timeline[1:]]
    assert any("- -> queued by submit" in e for e in events)
    assert any("queued -> sending by claim" in e for e in events)
    assert any("attempt 1: sent mock pm-1" in e for e in events)
    assert any("sending -> sent by worker" in e for e in events)
    assert any("report from mock: delivered applied" in e for e in events)


def test_resolve_export_and_erase_from_the_command_line(cli, db, ready):
    submit(db, ready, intent(channels=["whatsapp"]))
    row = claim(db, "whatsapp", lease=1)[0]
    db.execute("update notify.notification_deliveries set lease_expires_at = now() - interval '1 s'")
    call(db, "notify_api.run_maintenance_v1()")
    out = cli("deliveries", "resolve", "--tenant", "acme", str(row[1]), "--status", "failed", "--note", "console: rejected")
    assert "is now failed (resolved: console: rejected)" in out
    export = json.loads(cli("recipients", "export", "--tenant", "acme", "runner-42"))
    assert export["recipient"]["addresses"]["whatsapp"] == "+34600111222"
    with pytest.raises(SystemExit, match="--yes"):
        cli("recipients", "erase", "--tenant", "acme", "runner-42")
    receipt = json.loads(cli("recipients", "erase", "--tenant", "acme", "runner-42", "--yes"))
    assert receipt["erased_by"] == "cli" and receipt["rows_changed"]["recipient_addresses"] == 2
