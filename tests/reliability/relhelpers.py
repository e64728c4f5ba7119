"""Helpers and fixtures of the reliability suite.

Imported by its test modules (a conftest.py here would shadow tests/conftest.py's importable
name, see tests/platform/s3fixtures.py). Everything runs against real components: DuckDB
files, moto's S3 server on 127.0.0.1, the Prefect test server; faults are injected from the
outside (a loopback TCP proxy that cuts the connection, SIGKILL, a stopped server).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS / "platform") not in sys.path:  # s3fixtures lives there (no packages under tests/)
    sys.path.insert(0, str(TESTS / "platform"))

from nds.config import Workspace  # noqa: E402
from nds.formats.bundle import load_bundle  # noqa: E402
from nds.formats.scores import write_scores  # noqa: E402


def copy_workspace(src: Path, dst: Path) -> Workspace:
    """A private copy of an indexed workspace (DuckDB's WAL is transient state, left behind)."""
    from nds.platform import warehouse
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.duckdb.wal"), symlinks=True)
    ws = Workspace(Path(dst).resolve())
    # The `selections` view names its folder by absolute path; a writer connection re-renders
    # it for the copy, so the copy's view reads the copy's rows, not the original's.
    with warehouse.connect(ws.warehouse_path):
        pass
    return ws


def snapshot(*roots: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `roots` (what "stored data untouched" compares)."""
    out: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                out[f"{root}:{path.relative_to(root)}"] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_symlink() or path.is_dir():
                out[f"{root}:{path.relative_to(root)}/"] = "dir" if path.is_dir() else f"link:{os.readlink(path)}"
    return out


def valid_scores(ws: Workspace, *, favour: int = 0) -> dict:
    """A scores.json document for `ws`'s current bundle that favours expert `favour`."""
    bundle = load_bundle(ws.stage_dir("experts"), verify=False)
    k = int(bundle["k"])
    scores = [0.5] * k
    scores[favour] = 0.9
    return {"format": 1, "index_version": bundle["index_version"], "bundle_sha256": bundle["bundle_sha256"],
            "mode": "rotation", "k": k, "scores": scores, "seconds_per_expert": [0.0] * k}


def write_valid_scores(ws: Workspace, path: Path, *, favour: int = 0) -> Path:
    doc = valid_scores(ws, favour=favour)
    bundle = load_bundle(ws.stage_dir("experts"), verify=False)
    write_scores(path, bundle=bundle, mode="rotation", scores=doc["scores"], seconds_per_expert=doc["seconds_per_expert"])
    return path


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`nds ARGV` in this process: (exit code, stdout, stderr); argparse exits are caught."""
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of an S3 server that "stops" it mid-way.

    After `cut_after` HTTP requests have been forwarded, every open connection is closed and
    every new one is accepted and closed at once, as a server that died does; those refused
    attempts are counted, so a test can check that the client's retries are bounded.
    """

    def __init__(self, upstream: str, *, cut_after: int):
        host, port = upstream.rsplit("//", 1)[-1].split(":")
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.requests = 0
        self.refused = 0
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                with self._lock:
                    self.refused += 1
                client.close()
                continue
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while not self.cut.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if from_client:
                    with self._lock:
                        # Request lines of the S3 REST API ("PUT /bucket/key HTTP/1.1").
                        self.requests += data.count(b" HTTP/1.1\r\n")
                        if self.requests > self.cut_after:
                            self._cut_locked()
                            return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _cut_locked(self) -> None:
        self.cut.set()
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._cut_locked()
        self._listener.close()


@pytest.fixture(scope="module")
def rel_ws(tiny_index, tmp_path_factory) -> Workspace:
    """A private copy of the tiny indexed workspace for one test module."""
    src, _ = tiny_index
    return copy_workspace(src.root, tmp_path_factory.mktemp("rel-ws") / "ws")
