"""`nds serve` and `nds client request` refuse bad input with one `error:` line (exit 2), before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from servehelpers import REPO, free_port, synth, synthetic_scores  # noqa: F401


def nds(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_serve_without_an_index(tmp_path):
    r = nds("--root", str(tmp_path), "serve", "--port", str(free_port()))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: ") and "build the index first (`nds index`)" in r.stderr


@pytest.mark.parametrize("args, env, words", [
    (["--server", "http://127.0.0.1:1", "--scores", "{tmp}/missing.json"], {"NDS_TOKEN": "nds_x"}, "not found"),
    (["--server", "http://127.0.0.1:1", "--scores", "{tmp}/scores.json"], {"NDS_TOKEN": ""}, "no token"),
    (["--server", "127.0.0.1:8600", "--scores", "{tmp}/scores.json"], {"NDS_TOKEN": "nds_x"}, "not an http(s):// URL"),
    (["--server", "http://127.0.0.1:1", "--scores", "{tmp}/scores.json", "--cacert", "{tmp}/nope.pem"],
     {"NDS_TOKEN": "nds_x"}, "--cacert"),
    (["--server", "http://127.0.0.1:1", "--scores", "{tmp}/scores.json", "--retries", "0"], {"NDS_TOKEN": "nds_x"},
     "did not answer after 1 attempts (ConnectError"),
])
def test_client_request_bad_input(synth, tmp_path, args, env, words):
    _, info = synth
    (tmp_path / "scores.json").write_text(json.dumps(synthetic_scores(info)))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = nds("client", "request", *argv, "--budget", "10", "--out", str(tmp_path / "sel"), env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "sel").exists()


def test_client_request_refuses_a_used_out_folder(synth, tmp_path):
    _, info = synth
    (tmp_path / "scores.json").write_text(json.dumps(synthetic_scores(info)))
    (tmp_path / "sel").mkdir()
    (tmp_path / "sel" / "keep.txt").write_text("mine")
    r = nds("client", "request", "--server", "http://127.0.0.1:1", "--scores", str(tmp_path / "scores.json"),
            "--budget", "10", "--out", str(tmp_path / "sel"), env={"NDS_TOKEN": "nds_x"})
    assert r.returncode == 2 and "is not empty" in r.stderr and (tmp_path / "sel" / "keep.txt").read_text() == "mine"
