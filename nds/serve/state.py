"""The service's state folder: which client made which selection, and the request ids answered.

    <state>/tokens.json                                     hashed tokens (nds.serve.tokens)
    <state>/clients/<client id>/selections/<selection id>.json   one file per selection it made
    <state>/clients/<client id>/requests/<sha256 of request id>.json   request id -> selection id
    <state>/index-cache/<index version>-<hash>/              memory-mappable index (nds.serve.holder)

The state folder defaults to `serve/` beside the warehouse (the DuckDB file and its
`selections/` audit rows), so one workspace's server state stays together; `NDS_SERVE_STATE`
or `nds serve --state` moves it. Every file is written atomically; a request id is handled
under an exclusive file lock, so retries are idempotent across threads, worker processes and
restarts (a retry after a crash finds the selection id that was promised).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from nds._io import write_json
from nds.config import Workspace

STATE_ENV = "NDS_SERVE_STATE"
#: Selection ids as nds.select.service.new_selection_id makes them; anything else is never a path.
SELECTION_ID_RE = re.compile(r"^sel-\d{8}T\d{6}-[0-9a-f]{32}$")


def default_state_dir(ws: Workspace, override: str | os.PathLike | None = None) -> Path:
    """`override`, else $NDS_SERVE_STATE, else `serve/` beside the warehouse file."""
    chosen = override or os.environ.get(STATE_ENV)
    return Path(chosen).resolve() if chosen else ws.warehouse_path.resolve().parent / "serve"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing), held across processes until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class SelectionBook:
    """Ownership of selections and the request ids each client has used."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir)

    def _client(self, client_id: str) -> Path:
        return self.root / "clients" / client_id

    @staticmethod
    def _request_key(request_id: str) -> str:
        return hashlib.sha256(request_id.encode()).hexdigest()

    @contextmanager
    def request_lock(self, client_id: str, request_id: str) -> Iterator[None]:
        """Serialise every attempt of one (client, request id), in this process and others."""
        key = self._request_key(request_id)
        with file_lock(self._client(client_id) / "locks" / f"{key}.lock"):
            yield

    def find_request(self, client_id: str, request_id: str) -> dict | None:
        """{"selection_id", "fingerprint", "created_at"} promised to an earlier attempt, or None."""
        return _read(self._client(client_id) / "requests" / f"{self._request_key(request_id)}.json")

    def promise(self, client_id: str, request_id: str, selection_id: str, fingerprint: str) -> None:
        """Record, before the work starts, which selection id this request id will get."""
        write_json(self._client(client_id) / "requests" / f"{self._request_key(request_id)}.json",
                   {"selection_id": selection_id, "fingerprint": fingerprint,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def record(self, client_id: str, client_name: str, summary: dict) -> None:
        """The client owns this (completed) selection."""
        sid = summary["selection_id"]
        write_json(self._client(client_id) / "selections" / f"{sid}.json", {
            "selection_id": sid, "client": client_name, "index_version": summary.get("index_version"),
            "rows": summary.get("rows"), "created_at": summary.get("created_at"),
        })

    def owns(self, client_id: str, selection_id: str) -> bool:
        return bool(SELECTION_ID_RE.match(selection_id)) and \
            (self._client(client_id) / "selections" / f"{selection_id}.json").is_file()

    def list(self, client_id: str) -> list[dict]:
        """The client's selections, oldest first (ids are time-ordered)."""
        folder = self._client(client_id) / "selections"
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob("sel-*.json")):
            doc = _read(path)
            if doc:
                out.append(doc)
        return out
