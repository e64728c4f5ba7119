"""The client walk-through over HTTP on a real (tiny) index: fetch, score, request, download.

Every client step is the `nds` command a user runs on their own machine; the only link to the
server is its URL and a token. Timed per step (printed with -s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from servehelpers import REPO, ServeProcess, tokens

from nds.formats.manifest import load_manifest


def test_fetch_score_request_download_over_http(tiny_index, tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "reliability"))
    from relhelpers import copy_workspace

    ws = copy_workspace(tiny_index[0].root, tmp_path / "server")
    token = tokens(ws, "alice")["alice"]
    client = tmp_path / "client"
    client.mkdir()
    env = {**os.environ, "NDS_TOKEN": token}
    timings = {}

    def nds(step, *args, root=None):
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "flows.cli", "-q", *(["--root", str(root)] if root else []), *args]
        r = subprocess.run(cmd, cwd=client, env=env, capture_output=True, text=True, timeout=600)
        timings[step] = time.monotonic() - t0
        assert r.returncode == 0, f"{step}: {r.stderr[-2000:]}"
        return r

    # the server's machine makes a task from held-out images (stands in for the client's own data)
    nds("holdout", "corpus", "holdout", "--dataset", "mnist", "--per-class", "5", "--out", str(client / "task"), root=ws.root)
    with ServeProcess(ws.root, "--rate-limit", "0") as server:
        nds("fetch", "client", "fetch-experts", f"{server.url}/v1/bundle", "--out", str(client / "experts"))
        nds("score", "client", "score", "--experts", str(client / "experts"), "--data", str(client / "task"),
            "--out", str(client / "scores.json"))
        r = nds("request", "client", "request", "--server", server.url, "--scores", str(client / "scores.json"),
                "--budget", "0.1", "--fill", "0.2", "--out", str(client / "selection"))
        assert token not in server.log() and token not in r.stdout + r.stderr
    summary = json.loads((client / "selection" / "summary.json").read_text())
    assert load_manifest(client / "selection").num_rows == summary["rows"] > 0
    assert summary["index_version"] == tiny_index[1]["index_version"]
    # the download reads the server's corpus here (the tiny index has no presigned links)
    nds("download", "client", "download", "--manifest", str(client / "selection"), "--out", str(client / "pretrain"),
        root=ws.root)
    pngs = list((client / "pretrain").rglob("*.png"))
    # reserve rows (--fill) stand by for dead links; every link works here, so the budget is downloaded
    assert summary["reserve"] > 0 and summary["rows"] == summary["budget"] + summary["reserve"]
    assert len(pngs) == summary["budget"]
    print("client walk-through over HTTP (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
