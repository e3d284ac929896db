"""Schemathesis against the served OpenAPI document of a running API process on a real database, every
operation, with a valid key: no 5xx, every response (errors included) matches the documented schema and
content type. The CLI is used (its pytest plugin does not support pytest 9); the example count is printed."""

from __future__ import annotations

import re
import subprocess
import sys

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import REMINDER, call, start_service, stop_service, url_of

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_server_error_and_no_contract_violation(db: psycopg.Connection, tmp_path) -> None:  # noqa: ANN001
    service = start_service(url_of(db), tmp_path)
    try:
        call(db, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", service.tenant_id, Jsonb(REMINDER))
        result = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{service.base_url}/schema/openapi.json",
             "-H", f"Authorization: Bearer {service.key}",
             "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
             "--phases", "examples,fuzzing,stateful", "--max-examples", "15", "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=600)
        summary = result.stdout[-3000:]
        generated = re.search(r"(\d+) generated", summary)
        print(f"\nschemathesis: {generated.group(0) if generated else '?'}")
        assert result.returncode == 0, summary
        assert generated and int(generated.group(1)) > 200, summary
    finally:
        stop_service(service)
