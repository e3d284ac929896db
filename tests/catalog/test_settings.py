"""Settings are declared once (dispatcher/settings.py) and documented once (README.md, "Configuration"): the two agree
both ways, nothing else reads the service's variables from the environment, and providers get exactly their part."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher import settings as declared
from dispatcher.settings import DECLARED, Group, Settings
from providers.base import ProviderSettings
from tests.conftest import ROOT

NAME = re.compile(r"`((?:DISPATCHER_[A-Z0-9_]+)|DATABASE_URL)`")


def readme_rows() -> list[tuple[list[str], str, str]]:
    """The configuration table: (variables of the first column, defaults cell, the whole row)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Configuration") :]
    section = section[: section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append((NAME.findall(cells[0]), cells[1], line))
    return rows


def test_every_declared_setting_is_documented_and_every_documented_one_declared():
    documented = {name for names, _, _ in readme_rows() for name in names}
    names = {d.env.name for d in DECLARED.values()}
    assert names - documented == set(), "declared in dispatcher/settings.py, missing from README.md's table"
    assert documented - names == set(), "in README.md's table, not declared in dispatcher/settings.py"


def test_secrets_and_fallbacks_are_documented_as_read():
    rows = {name: row for names, _, row in readme_rows() for name in names}
    for d in DECLARED.values():
        if d.env.secret:
            assert "_FILE" in rows[d.env.name], f"{d.env.name} is also read from {d.env.name}_FILE: say so in README.md"
        if d.env.fallback:
            assert d.env.fallback in rows[d.env.name]


def _shown(value: object) -> str:
    if value is None or value == []:
        return "—"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def test_the_readme_states_the_declared_defaults():
    by_env = {d.env.name: d for d in DECLARED.values()}
    for names, defaults, row in readme_rows():
        cells = [c.strip() for c in defaults.split(", ")]
        cells = cells * len(names) if len(cells) == 1 else cells
        assert len(cells) == len(names), row
        for name, cell in zip(names, cells, strict=True):
            d = by_env[name]
            if d.default is None:  # no value, or one derived from others (DISPATCHER_MOCK_WEBHOOK_URL): described
                continue
            shown = re.match(r"`([^`]*)`", cell)
            assert (shown.group(1) if shown else cell) == _shown(d.default), f"{name}: README says {cell}, declared {d.default!r}"


def test_every_setting_has_a_group_and_a_doc():
    for d in DECLARED.values():
        assert isinstance(d.env.group, Group) and d.env.doc.strip(), d.name
    assert {d.env.group for d in DECLARED.values()} == set(Group)


def test_providers_see_exactly_their_group_with_the_declared_types():
    fields = {f.name: f.type for f in __import__("msgspec").structs.fields(ProviderSettings)}
    group = {d.name: d.type for d in declared.of_group(Group.PROVIDERS)}
    assert fields == group
    view = ProviderSettings.of(Settings(database_url="postgresql:///x", public_url="https://n.example"))
    assert view.public_url == "https://n.example" and not hasattr(view, "database_url")


def _reads_the_environment(node: ast.AST) -> str | None:
    """The variable name of `os.environ.get("X")`, `os.getenv("X")`, `os.environ["X"]`, `environ.get("X")`."""
    target = None
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        f = node.func
        if isinstance(f, ast.Attribute) and (f.attr == "getenv" or (f.attr == "get" and "environ" in ast.unparse(f.value))):
            target = node.args[0].value
    elif isinstance(node, ast.Subscript) and "environ" in ast.unparse(node.value) and isinstance(node.slice, ast.Constant):
        target = node.slice.value
    return target if isinstance(target, str) else None


@pytest.mark.parametrize("package", ["dispatcher", "providers", "runner", "api", "cli"])
def test_only_the_declarations_read_the_services_variables(package: str):
    own = {d.env.name for d in DECLARED.values()} | {d.env.fallback for d in DECLARED.values() if d.env.fallback}
    direct = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path == ROOT / "dispatcher" / "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = _reads_the_environment(node)
            if name and (name in own or name.startswith("DISPATCHER_")):
                direct.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {name}")  # type: ignore[attr-defined]
    assert not direct, "read it through dispatcher.settings (Settings.from_env or read):\n" + "\n".join(direct)


def test_values_are_parsed_as_declared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for d in DECLARED.values():
        for name in (d.env.name, f"{d.env.name}_FILE", d.env.fallback):
            if name:
                monkeypatch.delenv(name, raising=False)
    secret_file = tmp_path / "url"
    secret_file.write_text("postgresql:///from-file\n")
    monkeypatch.setenv("DISPATCHER_DATABASE_URL_FILE", str(secret_file))
    monkeypatch.setenv("DISPATCHER_PORT", "9001")
    monkeypatch.setenv("DISPATCHER_HOST", "")  # empty: the default
    monkeypatch.setenv("DISPATCHER_METRICS_PORT", "0")  # 0: not served
    monkeypatch.setenv("DISPATCHER_DEV_MODE", "yes")
    monkeypatch.setenv("DISPATCHER_LOG_DELIVERIES", "0")
    monkeypatch.setenv("DISPATCHER_MOCK_RECORD", "maybe")  # neither: the default
    monkeypatch.setenv("DISPATCHER_WHATSAPP_APP_SECRET", "new old")
    monkeypatch.setenv("DISPATCHER_MOCK_OUTCOMES", '{"+34600000001": "failed"}')
    monkeypatch.setenv("DISPATCHER_RENDER_TIMEOUT_MS", "750")
    s = Settings.from_env()
    assert (s.database_url, s.port, s.host, s.metrics_port) == ("postgresql:///from-file", 9001, "127.0.0.1", None)
    assert (s.dev_mode, s.log_deliveries, s.mock_record) == (True, False, True)
    assert s.whatsapp_app_secrets == ["new", "old"] and s.mock_outcomes == {"+34600000001": "failed"}
    assert s.render_timeout_ms == 750.0 and isinstance(s.render_timeout_ms, float)
    assert s.mock_webhook_url == "http://127.0.0.1:9001/public/webhooks/mock"
    assert Settings.from_env(database_url="x", port=7000).mock_webhook_url == "http://127.0.0.1:7000/public/webhooks/mock"
    monkeypatch.delenv("DISPATCHER_DATABASE_URL_FILE")
    with pytest.raises(SystemExit, match="DATABASE_URL is not set"):
        Settings.from_env()
    assert Settings.from_env(database_url="postgresql:///given").database_url == "postgresql:///given"


def test_the_maintenance_and_retention_crons_are_still_configurable():
    """They are read when runner.tasks registers the periodic tasks (procrastinate needs them then)."""
    code = (
        "from runner.app import app; app.perform_import_paths(); "
        "print([t.cron for t in app.periodic_registry.periodic_tasks.values()])"
    )
    env = {"PATH": "/usr/bin:/bin", "DISPATCHER_MAINTENANCE_CRON": "*/5 * * * * 30", "DISPATCHER_RETENTION_CRON": "0 3 * * * 0"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['*/5 * * * * 30', '0 3 * * * 0']"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == repr([DECLARED["maintenance_cron"].default, DECLARED["retention_cron"].default])
