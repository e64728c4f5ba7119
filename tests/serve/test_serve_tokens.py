"""`nds tokens create|revoke|list`: the token printed once, stored only as its sha256, atomically."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

from servehelpers import REPO

from nds.config import Workspace
from nds.serve.state import default_state_dir
from nds.serve.tokens import TokenStore


def nds(root, *args):
    return subprocess.run([sys.executable, "-m", "flows.cli", "--root", str(root), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_create_prints_the_token_once_and_stores_its_hash(tmp_path):
    ws = Workspace(tmp_path.resolve())
    r = nds(ws.root, "tokens", "create", "alice")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    token = lines[-1]
    assert len(lines) == 1 and token.startswith("nds_") and len(token) > 40
    path = default_state_dir(ws) / "tokens.json"
    assert path.parent == ws.warehouse_path.parent / "serve"
    text = path.read_text()
    assert token not in text and hashlib.sha256(token.encode()).hexdigest() in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]  # atomic write left no temp file
    assert TokenStore(path.parent).authenticate(token).name == "alice"
    # a second token under the same name is refused; the first stays valid
    again = nds(ws.root, "tokens", "create", "alice")
    assert again.returncode == 2 and again.stderr.startswith("error: a token named 'alice' exists: revoke it first")
    assert again.stdout == "" and path.read_text() == text
    listed = nds(ws.root, "tokens", "list")
    assert "alice" in listed.stdout and hashlib.sha256(token.encode()).hexdigest() not in listed.stdout


def test_revoke_and_bad_names(tmp_path):
    ws = Workspace(tmp_path.resolve())
    store = TokenStore(default_state_dir(ws))
    old = store.create("bob")
    old_id = store.authenticate(old).id
    for name in ("../x", "a b", "", "x" * 65):
        r = nds(ws.root, "tokens", "create", name)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not allowed" in r.stderr
    r = nds(ws.root, "tokens", "revoke", "nobody")
    assert r.returncode == 2 and "no token named 'nobody' (tokens: bob)" in r.stderr
    assert nds(ws.root, "tokens", "revoke", "bob").returncode == 0
    assert store.authenticate(old) is None
    new = store.create("bob")  # the name again: a new client id, so none of the old selections
    assert store.authenticate(new).id != old_id and store.authenticate(old) is None


def test_state_folder_can_move(tmp_path, monkeypatch):
    ws = Workspace((tmp_path / "ws").resolve())
    r = nds(ws.root, "tokens", "create", "carol", "--state", str(tmp_path / "elsewhere"))
    assert r.returncode == 0 and (tmp_path / "elsewhere" / "tokens.json").is_file()
    monkeypatch.setenv("NDS_SERVE_STATE", str(tmp_path / "env"))
    assert default_state_dir(ws) == (tmp_path / "env").resolve()
    doc = json.loads((tmp_path / "elsewhere" / "tokens.json").read_text())
    assert set(doc["tokens"]["carol"]) == {"id", "sha256", "created_at"}
    assert not os.path.exists(ws.warehouse_path.parent / "serve" / "tokens.json")
