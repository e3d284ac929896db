"""`dispatcher quiet-hours show|set|delete` and `dispatcher caps show|set|delete`, run in process against the suite's
database as the application login."""

from __future__ import annotations

import json

import pytest

from cli.commands import main
from tests.conftest import app_url, call


@pytest.fixture
def cli(db, db_url, ready, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", app_url(db_url))

    def run(*argv: str) -> str:
        main(list(argv))
        return capsys.readouterr().out

    return run


def test_quiet_hours_from_the_command_line(cli, db, ready):
    assert json.loads(cli("quiet-hours", "show", "--tenant", "acme"))["default"] is True
    out = json.loads(
        cli(
            "quiet-hours", "set", "--tenant", "acme", "--start", "21:00", "--end", "08:00", "--timezone", "Europe/Madrid",
            "--category", "reminder=20:00-09:00", "--exempt", "password_reset",
        )
    )  # fmt: skip
    assert (out["start"], out["end"], out["timezone"]) == ("21:00", "08:00", "Europe/Madrid")
    assert out["categories"] == {"reminder": {"start": "20:00", "end": "09:00"}, "password_reset": {"exempt": True}}
    assert call(db, "notify_api.get_quiet_hours_v1(%s)", ready) == out
    with pytest.raises(SystemExit, match="end must differ from start"):
        cli("quiet-hours", "set", "--tenant", "acme", "--start", "21:00", "--end", "21:00")
    with pytest.raises(SystemExit, match="NAME=HH:MM-HH:MM"):
        cli("quiet-hours", "set", "--tenant", "acme", "--category", "reminder")
    assert json.loads(cli("quiet-hours", "delete", "--tenant", "acme"))["default"] is True


def test_caps_from_the_command_line(cli, db, ready):
    assert json.loads(cli("caps", "show", "--tenant", "acme"))["caps"] == []
    out = json.loads(
        cli(
            "caps", "set", "--tenant", "acme", "--cap", "max=3,period=P1D,category=reminder",
            "--cap", "max=1,period=PT10M,channel=whatsapp,action=hold",
        )
    )  # fmt: skip
    assert out["caps"] == [
        {"max": 3, "period": "P1D", "channel": None, "category": "reminder", "action": "suppress"},
        {"max": 1, "period": "PT10M", "channel": "whatsapp", "category": None, "action": "hold"},
    ]
    assert call(db, "notify_api.get_frequency_caps_v1(%s)", ready) == out
    with pytest.raises(SystemExit, match=r"caps\[0\].period must be 1 second to 31 days"):
        cli("caps", "set", "--tenant", "acme", "--cap", "max=3,period=P40D")
    with pytest.raises(SystemExit, match="--cap must be"):
        cli("caps", "set", "--tenant", "acme", "--cap", "3 per day")
    assert json.loads(cli("caps", "delete", "--tenant", "acme"))["default"] is True
