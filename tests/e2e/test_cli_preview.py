"""`dispatcher notifications preview`: a submission body's dry run from the command line, rendered with the worker's
renderer, run in process against the suite's database as the application login; it writes nothing."""

from __future__ import annotations

import io
import json

import pytest
from psycopg.types.json import Jsonb

from cli.commands import main
from tests.conftest import app_url, call, intent


@pytest.fixture
def cli(db, db_url, ready, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", app_url(db_url))
    monkeypatch.setenv("DISPATCHER_RENDER_PROCESSES", "1")

    def run(*argv: str, stdin: str | None = None) -> str:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        main(list(argv))
        return capsys.readouterr().out

    return run


def test_preview_from_a_file_and_from_stdin(cli, db, ready, tmp_path):
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "email", "status": "revoked", "source": "unsubscribe_link"}),
    )
    path = tmp_path / "body.json"
    path.write_text(json.dumps(intent()))
    out = cli("notifications", "preview", "--tenant", "acme", str(path))
    lines = out.splitlines()
    assert lines[0] == "preview: the submission would be accepted"
    assert lines[1].split() == ["recipient", "channel", "sends", "status", "due", "provider", "why", "not"]
    wa = next(line for line in lines if " whatsapp " in line)
    email = next(line for line in lines if " email " in line)
    assert " yes " in wa and "mock (default_mock)" in wa
    assert " no " in email and "no_consent [consent #" in email and "revoked by unsubscribe_link" in email
    assert "  parameters: ['Ana', 'Long run']" in out and "  subject: Reminder: Long run" in out
    answer = json.loads(
        cli("notifications", "preview", "--tenant", "acme", "-", "--json", stdin=json.dumps(intent(variables={"name": "Ana"})))
    )
    assert answer["outcome"] == "refused" and answer["refused"]["field"] == "variables.event"
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 0


def test_a_body_the_submission_refuses_is_an_error(cli):
    with pytest.raises(SystemExit) as info:
        cli("notifications", "preview", "--tenant", "acme", "-", stdin=json.dumps(intent(channels=["pigeon"])))
    assert "channel" in str(info.value.code)
