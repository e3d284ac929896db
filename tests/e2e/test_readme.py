"""The README works when followed literally: its fenced code blocks are run in order against a fresh dev stack
(`dispatcher dev` in a subprocess, on a free port, with its own data dir), as a reader would run them from the
checkout: bash blocks with `bash -euo pipefail`, SQL blocks through psql on the dev database, Python blocks with
the venv's python. Each must exit 0, print no problem+json answer, and print what the README says it answers
(`# -> …` / `-- -> …` lines). A block that is not meant to run is marked `<!-- readme-test: skip (why) -->` on the
line before it; any other block in a language this test cannot run fails the test."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.dev_stack import DevStack

README = ROOT / "README.md"
RUNNERS = {"bash", "python", "sql"}
INERT = {"text", "json"}  # shown, never run: output or payload samples
SKIP = re.compile(r"^<!-- readme-test: skip \((?P<why>.+)\) -->$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
ANSWER = re.compile(r"(?:^|\s)(?:#|--)\s*->\s*(?P<answer>.+)$")  # a comment line, or a trailing comment
PAIR = re.compile(r'"[\w-]+":\s*(?:"[^"…]*"|true|false|null|-?\d+)')
PROBLEM = "urn:notification-dispatcher:problem:"
DEV_PORT = "127.0.0.1:8000"


@dataclasses.dataclass
class Block:
    line: int
    lang: str
    code: str
    skip: str | None  # the reason, when marked

    def answers(self) -> list[str]:
        return [m.group("answer") for m in map(ANSWER.search, self.code.splitlines()) if m]


def blocks(text: str) -> list[Block]:
    """The README's fenced blocks, in order; refuses an unmarked block it could not run."""
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group("lang").lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{start + 1}: unterminated code block"
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(before.strip())
        block = Block(start + 1, lang, "\n".join(lines[start + 1 : end]) + "\n", skip.group("why") if skip else None)
        if block.skip is None and lang not in RUNNERS | INERT:
            raise AssertionError(
                f"README.md:{block.line}: a ```{lang or '(no language)'} block is neither run by "
                f"tests/e2e/test_readme.py ({', '.join(sorted(RUNNERS))}) nor marked "
                "<!-- readme-test: skip (why) --> on the line before it"
            )
        found.append(block)
        i = end + 1
    return found


def normalized(text: str) -> str:
    return re.sub(r"\s+", "", text)


def check_answers(block: Block, out: str) -> None:
    for answer in block.answers():
        pairs = PAIR.findall(answer)
        expected = pairs or [answer.split("|")[0].split("#")[0].strip()]
        for item in expected:
            assert normalized(item) in normalized(out), f"README.md:{block.line}: says `-> {answer}`, but it printed:\n{out}"


def test_every_readme_block_is_run_or_marked() -> None:
    found = blocks(README.read_text())
    run = [b for b in found if b.skip is None and b.lang in RUNNERS]
    assert {b.lang for b in run} == RUNNERS, [(b.line, b.lang) for b in run]  # the walk-through, Python and SQL
    assert all(b.answers() for b in run), [b.line for b in run if not b.answers()]  # each states what it answers


def test_the_extractor_refuses_an_unmarked_block_it_cannot_run() -> None:
    with pytest.raises(AssertionError, match="neither run"):
        blocks("text\n\n```console\n$ make\n```\n")
    with pytest.raises(AssertionError, match="neither run"):
        blocks("```\nls\n```\n")
    assert blocks("<!-- readme-test: skip (a deployment) -->\n```yaml\na: 1\n```\n")[0].skip == "a deployment"


@pytest.mark.slow
def test_the_readme_runs_as_written(tmp_path: Path) -> None:
    found = blocks(README.read_text())
    # A checkout as the reader has it: .venv and .dispatcher (the dev stack's data dir) in the working directory.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(ROOT / ".venv")
    data_dir = checkout / ".dispatcher"
    stack = DevStack(data_dir, tmp_path / "dev.log", drop=("KEY", "URL"), timeout=90)
    port, env, log = stack.port, stack.env, stack.log
    try:
        # No DATABASE_URL, as in a reader's fresh shell: the CLI (`dispatcher psql` for SQL blocks) finds the running
        # dev database in ./.dispatcher by itself. psql stops at the first error (PSQLRC), and an ERROR on stderr fails.
        run_env = {**env, "PSQLRC": str(tmp_path / "psqlrc")}
        (tmp_path / "psqlrc").write_text("\\set ON_ERROR_STOP on\n")
        psql = [str(checkout / ".venv" / "bin" / "dispatcher"), "psql"]
        ran = 0
        for n, block in enumerate(found):
            if block.skip is not None or block.lang in INERT:
                continue
            code = block.code.replace(DEV_PORT, f"127.0.0.1:{port}")
            script = tmp_path / f"block{n}.{block.lang}"
            script.write_text(code)
            command = {
                "bash": ["bash", "-euo", "pipefail", str(script)],
                "python": [str(checkout / ".venv" / "bin" / "python"), str(script)],
                "sql": psql,
            }[block.lang]  # SQL is pasted: psql reads it from standard input
            done = subprocess.run(
                command,
                cwd=checkout,
                env=run_env,
                capture_output=True,
                text=True,
                timeout=120,
                input=code if block.lang == "sql" else None,
            )
            where = f"README.md:{block.line} ({block.lang})"
            print(f"--- {where}\n{done.stdout}\n{done.stderr}")  # shown by pytest when the test fails
            assert done.returncode == 0, f"{where} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            assert PROBLEM not in done.stdout, f"{where} got an error answer:\n{done.stdout}"
            assert "ERROR:" not in done.stderr, f"{where}:\n{done.stderr}"
            check_answers(block, done.stdout)
            ran += 1
        assert ran >= 3
    finally:
        code = stack.stop()
    assert code == 0, log.read_text()
