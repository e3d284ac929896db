"""Each layer imports only the layers below it (docs/architecture.md, "Layers"), read from the source with ast (nothing
is imported or run): dispatcher/ (the shared core) → providers/ → runner/ and api/ (never each other) → cli/.
Imports inside functions count as much as those at the top; `if TYPE_CHECKING:` imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# What each package may import of the project's own packages (itself always).
ALLOWED = {
    "dispatcher": set(),
    "providers": {"dispatcher"},
    "runner": {"dispatcher", "providers"},
    "api": {"dispatcher", "providers"},
    "cli": {"dispatcher", "providers", "runner", "api"},
}
# The one exception: `python -m dispatcher` forwards to the CLI, importing it inside its main function only.
ENTRY_SHIM = ("dispatcher/__main__.py", "cli.commands")


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) for every import of a file; relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    module = child.module or ""
                found.append((child.lineno, module, in_function))
                # `from runner import tasks` imports the module runner.tasks too
                found.extend((child.lineno, f"{module}.{alias.name}", in_function) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_layer_package_is_checked():
    """A new top-level package of the project must be placed in a layer here (and in docs/architecture.md)."""
    own = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench", "dispatcher_client"}
    assert own == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_layer_imports_only_layers_below_it(package: str):
    wrong = []
    for path in files(package):
        rel = path.relative_to(ROOT).as_posix()
        for line, module, in_function in imports(path):
            top = module.split(".")[0]
            if top not in ALLOWED or top == package or top in ALLOWED[package]:
                continue
            if rel == ENTRY_SHIM[0] and module.startswith(ENTRY_SHIM[1]) and in_function:
                continue
            wrong.append(f"{rel}:{line} imports {module}")
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package]) or 'itself'}:\n" + "\n".join(wrong)


def test_the_entry_shim_imports_the_cli_only_when_run():
    found = [(module, in_function) for _, module, in_function in imports(ROOT / ENTRY_SHIM[0])]
    assert found == [(ENTRY_SHIM[1], True), (f"{ENTRY_SHIM[1]}.main", True)]


def test_no_import_cycles_between_modules():
    """runner/app.py and runner/tasks.py once imported each other (one of the two imports hidden in a function): the
    graph of the project's modules, imports inside functions included, has no cycle."""
    graph: dict[str, set[str]] = {}
    names = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for package in ALLOWED
        for p in files(package)
    }
    for name, path in names.items():
        graph[name] = {module for _, module, _ in imports(path) if module in names and module != name}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt]))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_the_checker_sees_what_it_must_refuse(tmp_path: Path):
    """The parser finds top-level, nested, `from x import y` and relative imports (a checker that sees none passes)."""
    pkg = tmp_path / "runner"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    src = pkg / "m.py"
    src.write_text("import api.app\nfrom . import tasks\n\ndef f():\n    from providers.base import Message\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert imports(src) == [
            (1, "api.app", False),
            (2, "runner", False),
            (2, "runner.tasks", False),
            (5, "providers.base", True),
            (5, "providers.base.Message", True),
        ]
    finally:
        ROOT = saved
