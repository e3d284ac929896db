"""Schemathesis against the served OpenAPI document of a running API process on a real database, every
operation, with a valid key and without one (no header, an unknown key, a revoked key): no 5xx, every response
(errors included) matches the documented schema and content type, and no protected operation answers without a
valid key. The CLI is used (its pytest plugin does not support pytest 9); the example count is printed."""

from __future__ import annotations

import re
import subprocess
import sys

import psycopg
import pytest
from psycopg.types.json import Jsonb

from dispatcher import keys
from tests.conftest import REMINDER, call, start_service, stop_service, url_of

pytestmark = pytest.mark.slow


CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def schemathesis(service, *args: str, examples: int = 15) -> int:  # noqa: ANN001
    """Runs the CLI against the service; returns the number of generated cases, after asserting the run passed."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{service.base_url}/schema/openapi.json",
            *args,
            "--phases",
            "examples,fuzzing,stateful",
            "--max-examples",
            str(examples),
            "--seed",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = result.stdout[-3000:]
    generated = re.search(r"(\d+) generated", summary)
    assert result.returncode == 0, summary
    assert generated, summary
    return int(generated.group(1))


def test_schemathesis_finds_no_server_error_and_no_contract_violation(db: psycopg.Connection, tmp_path) -> None:  # noqa: ANN001
    service = start_service(url_of(db), tmp_path)
    try:
        call(db, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", service.tenant_id, Jsonb(REMINDER))
        # ignored_auth: schemathesis also replays each authenticated case without the header and expects a refusal.
        generated = schemathesis(service, "-H", f"Authorization: Bearer {service.key}", "--checks", CHECKS + ",ignored_auth")
        print(f"\nschemathesis with a valid key: {generated} generated")
        assert generated > 200
        revoked = keys.generate()
        info = call(
            db,
            "notify_api.create_api_key_v1(%s, 'revoked', %s, %s)",
            service.tenant_id,
            keys.display_prefix(revoked),
            keys.digest(revoked),
        )
        call(db, "notify_api.revoke_api_key_v1(%s, %s)", service.tenant_id, info["id"])
        footprint = (
            "select (select count(*) from notify.notification_requests), (select count(*) from notify.recipients), "
            "(select count(*) from notify.templates), (select count(*) from notify.channel_policies)"
        )
        before = db.execute(footprint).fetchone()
        for label, headers in (
            ("no key", []),
            ("an unknown key", ["-H", f"Authorization: Bearer {keys.generate()}"]),
            ("a revoked key", ["-H", f"Authorization: Bearer {revoked}"]),
        ):
            generated = schemathesis(service, *headers, "--checks", CHECKS, examples=5)
            print(f"schemathesis with {label}: {generated} generated")
        assert db.execute(footprint).fetchone() == before  # the keyless runs changed nothing
    finally:
        stop_service(service)
