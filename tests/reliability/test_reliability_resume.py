"""The expert-training process is killed (SIGKILL) part-way; the rerun trains only the missing
experts and its bundle equals the uninterrupted run's, byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from nds.formats.bundle import load_bundle
from relhelpers import copy_workspace


def _stage(root, *extra):
    return [sys.executable, "-m", "flows.cli", "--root", str(root), "-q", *extra, "stage", "train_experts"]


def test_killed_expert_training_resumes_with_only_the_missing_experts(tiny_index, tmp_path):
    src, _ = tiny_index
    reference = load_bundle(src.stage_dir("experts"))  # the uninterrupted run (index flow)
    k = int(reference["k"])
    ws = copy_workspace(src.root, tmp_path / "ws")
    cache = ws.artifacts_dir / ".cache" / "experts"
    shutil.rmtree(cache)
    shutil.rmtree(ws.stage_dir("experts"))
    env = {**os.environ, "PYTHONPATH": str(ws.root)}

    proc = subprocess.Popen(_stage(ws.root), cwd=ws.root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(cache.glob("*.json")) if cache.exists() else True:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no expert finished in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.stem for p in cache.glob("*.json")}
    assert 1 <= len(done) < k, f"kill landed after {len(done)} of {k} experts"
    assert not ws.stage_dir("experts").exists()  # the stage output is only swapped in at the end

    rerun = subprocess.run(_stage(ws.root), cwd=ws.root, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reused = [line for line in rerun.stderr.splitlines() if "reused from" in line]
    trained = [line for line in rerun.stderr.splitlines() if "rotation acc" in line and "expert " in line]
    assert len(reused) == len(done) and len(trained) == k - len(done), rerun.stderr[-3000:]

    resumed = load_bundle(ws.stage_dir("experts"))  # verifies every expert's checksum
    assert resumed["index_version"] == reference["index_version"]
    assert resumed["bundle_sha256"] == reference["bundle_sha256"]
    assert [e["sha256"] for e in resumed["experts"]] == [e["sha256"] for e in reference["experts"]]
    for e in reference["experts"]:
        assert (ws.stage_dir("experts") / e["file"]).read_bytes() == (src.stage_dir("experts") / e["file"]).read_bytes()
    print(f"killed after {len(done)}/{k} experts; rerun reused {len(reused)}, trained {len(trained)}; bundle identical")
    assert json.loads((ws.stage_dir("experts") / "bundle.json").read_text())["k"] == k
