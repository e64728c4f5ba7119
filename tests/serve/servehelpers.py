"""Helpers of the service tests: a real `nds serve` process on 127.0.0.1 and a synthetic index.

Imported by the test modules (a conftest.py here would shadow tests/conftest.py's importable
name, see tests/platform/s3fixtures.py). The server is the real command (`python -m flows.cli
serve`) on a free loopback port, started and stopped by each test with bounded waits; the
index is written by benchmarks/synthetic_index.py in the files the index stages write.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
for extra in (REPO / "benchmarks", TESTS / "platform"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from synthetic_index import synthetic_scores, write_synthetic_index  # noqa: E402

from nds.config import Workspace  # noqa: E402
from nds.serve.state import default_state_dir  # noqa: E402
from nds.serve.tokens import TokenStore  # noqa: E402

START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`nds --root ROOT serve --port PORT ARGS...` as a child process; its output goes to a log file."""

    def __init__(self, root: Path, *args: str, port: int | None = None, env: dict | None = None, log: Path | None = None,
                 cacert: Path | None = None):
        self.root = Path(root)
        self.cacert = cacert  # TLS: the server's certificate (then the URL is https)
        self.port = port or free_port()
        self.args = list(args)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
        self.env.update(env or {})
        self.log_path = log or self.root / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.cacert else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "ServeProcess":
        cmd = [sys.executable, "-m", "flows.cli", "--root", str(self.root), "serve", "--port", str(self.port), *self.args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nds serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                verify = ssl.create_default_context(cafile=str(self.cacert)) if self.cacert else True
                if httpx.get(f"{self.url}/v1/health", timeout=2, verify=verify).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"nds serve did not answer within {START_TIMEOUT_S}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, in-flight work is cut wherever it is."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def tokens(ws: Workspace, *names: str) -> dict[str, str]:
    store = TokenStore(default_state_dir(ws))
    return {name: store.create(name) for name in names}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def audit_rows(ws: Workspace) -> list[dict]:
    """Every audit row file's rows (the `selections` view reads the same files)."""
    import pyarrow.parquet as pq

    from nds.select.service import selections_dir

    rows = []
    for path in sorted(selections_dir(ws).glob("sel-*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


@pytest.fixture
def synth(tmp_path):
    """A workspace holding a synthetic index (N = 3000, K = 8); returns (ws, info)."""
    ws = Workspace((tmp_path / "ws").resolve())
    info = write_synthetic_index(ws.root, n=3000, k=8)
    return ws, info


__all__ = ["ServeProcess", "audit_rows", "bearer", "free_port", "synth", "synthetic_scores", "tokens",
           "write_synthetic_index"]
