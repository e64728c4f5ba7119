"""Per-client API tokens: created once, shown once, stored hashed.

`tokens.json` in the service's state folder maps a client name to a random client id (which
owns that client's selections) and the sha256 of its token; the token itself is printed once
by `nds tokens create NAME` and never stored or logged. Revoking deletes the entry: a running
server notices the file changed on the next request and refuses the token from then on. A
new token under a revoked name gets a new client id, so it does not see the old selections.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from nds._io import atomic_file
from nds.errors import InvalidInputError, NotFoundError
from nds.serve.state import file_lock

TOKENS_FILE = "tokens.json"
TOKEN_PREFIX = "nds_"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Client:
    """Who a token belongs to: `name` (for people and audit rows) and `id` (owns the selections)."""

    name: str
    id: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Create, revoke, list and check tokens; the file is re-read whenever it changes."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / TOKENS_FILE
        self._lock_path = Path(state_dir) / ".tokens.lock"
        self._seen: tuple | None = None
        self._by_hash: dict[str, Client] = {}
        self._mutex = threading.Lock()

    def _read(self) -> dict:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"format": 1, "tokens": {}}
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{self.path} is not valid JSON ({exc}): restore it or delete it and create the tokens again") from exc
        return doc

    def _write(self, doc: dict) -> None:
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            os.chmod(tmp, 0o600)

    def create(self, name: str) -> str:
        """A new token for client `name`; returns it (the only time it exists in clear)."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidInputError(f"token name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-'")
        with file_lock(self._lock_path):
            doc = self._read()
            if name in doc["tokens"]:
                raise InvalidInputError(f"a token named {name!r} exists: revoke it first (`nds tokens revoke {name}`) "
                                        "or choose another name")
            token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            doc["tokens"][name] = {"id": secrets.token_hex(12), "sha256": hash_token(token),
                                   "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            self._write(doc)
        return token

    def revoke(self, name: str) -> None:
        with file_lock(self._lock_path):
            doc = self._read()
            if name not in doc["tokens"]:
                known = ", ".join(sorted(doc["tokens"])) or "none"
                raise NotFoundError(f"no token named {name!r} (tokens: {known}): `nds tokens list` shows them")
            del doc["tokens"][name]
            self._write(doc)

    def list(self) -> list[dict]:
        """[{"name", "created_at"}] sorted by name (never the hashes)."""
        doc = self._read()
        return [{"name": n, "created_at": e.get("created_at")} for n, e in sorted(doc["tokens"].items())]

    def authenticate(self, token: str | None) -> Client | None:
        """The client a presented token belongs to, or None (unknown, revoked or malformed)."""
        if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 256:
            return None
        self._refresh()
        return self._by_hash.get(hash_token(token))

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen == self._seen:
            return
        with self._mutex:
            doc = self._read() if seen else {"tokens": {}}
            self._by_hash = {e["sha256"]: Client(name=n, id=e["id"]) for n, e in doc["tokens"].items()}
            self._seen = seen
