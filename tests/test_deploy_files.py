"""No Docker engine runs here, so the deployment files are checked for syntax and shape."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from tests.conftest import ROOT


def test_compose_defines_the_stack():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "api", "worker", "mailpit"}
    assert services["migrate"]["command"] == ["dispatcher", "migrate"]
    assert services["migrate"]["environment"]["DATABASE_URL"].startswith("postgresql://dispatcher:")   # the owner migrates
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["environment"]["DATABASE_URL"].startswith("postgresql://dispatcher_app:")   # the app role runs
    init = (ROOT / "deploy" / "postgres-init.sql").read_text()
    assert "create role dispatcher_app login" in init and "in role notify_service" in init
    assert any(v.endswith("/docker-entrypoint-initdb.d/10-roles.sql:ro") for v in services["postgres"]["volumes"])
    assert "1025:1025" in services["mailpit"]["ports"]
    assert services["postgres"]["healthcheck"]["test"]


def test_dockerfile_copies_everything_the_image_runs():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and re.search(r"^FROM python:3\.1[1-9]", text, re.M)
    for folder in ("dispatcher", "api", "runner", "providers", "sql", "migrations"):
        assert f"COPY {folder} ./{folder}" in text
    assert re.search(r"^USER \w+", text, re.M) and "CMD [" in text


def test_justfile_recipes_exist():
    text = (ROOT / "justfile").read_text()
    for recipe in ("dev", "test", "migrate", "serve", "worker"):
        assert re.search(rf"^{recipe}\b.*:", text, re.M), recipe


def test_the_cli_documents_every_command():
    out = subprocess.run([sys.executable, "-m", "dispatcher", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for command in ("dev", "migrate", "serve", "worker", "tenant", "key"):
        assert command in out
