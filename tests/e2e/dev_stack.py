"""`dispatcher dev` in a subprocess, as a user starts it: no DATABASE_URL (an embedded PostgreSQL in its data folder),
a free port, its log in a file. Shared by the quickstart, README and dev-stack tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port


class DevStack:
    def __init__(
        self, data: Path, log: Path, *, env: dict[str, str] | None = None, drop: tuple[str, ...] = (), timeout: float = 60
    ) -> None:
        self.port = free_port()
        self.data = data
        self.log = log
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_") and k != "DATABASE_URL" and k not in drop
        }
        environment.update(env or {})
        self.env = environment
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "dev", "--port", str(self.port), "--data-dir", str(self.data)],
            cwd=ROOT,
            env=environment,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        self.key = re.search(r"API key: (nd_\S+)", self.text()).group(1)  # type: ignore[union-attr]

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()
            time.sleep(0.2)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.key}"}, timeout=10)

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(60)
