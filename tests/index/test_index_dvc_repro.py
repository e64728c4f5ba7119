"""DVC versioning of the index: a Prefect run is recorded in dvc.lock; params changes rerun only what they touch."""

import shutil
import subprocess
import sys

import yaml

from nds.config import Workspace
from nds.platform.dvc import dvc_env


def _dvc(ws, *args):
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws.root, env=dvc_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_prefect_run_is_recorded_and_params_change_reruns_only_affected_stages(tiny_index, tmp_path):
    src, summary = tiny_index
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src.root, ws.root, symlinks=True)

    assert "up to date" in _dvc(ws, "status")  # the flow's run is what dvc.lock records
    features = ws.stage_dir("extract") / "features.npy"
    before = features.stat().st_mtime_ns

    params = yaml.safe_load(ws.params_path.read_text())
    params["cluster"]["k"] = 5
    ws.params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    out = _dvc(ws, "repro")
    assert "Stage 'extract' didn't change, skipping" in out
    for stage in ("cluster", "train_experts", "compute_weights"):
        assert f"Running stage '{stage}'" in out
    assert features.stat().st_mtime_ns == before
    assert "up to date" in _dvc(ws, "status")

    lock = yaml.safe_load((ws.root / "dvc.lock").read_text())
    assert lock["stages"]["cluster"]["params"]["params.yaml"]["cluster"]["k"] == 5
    import json

    assert json.loads((ws.stage_dir("cluster") / "clusters.json").read_text())["k"] == 5
    assert "up to date" in _dvc(ws, "repro")  # nothing left to do


def test_push_and_pull_through_a_local_remote(tiny_index, tmp_path):
    src, _ = tiny_index
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src.root, ws.root, symlinks=True)
    _dvc(ws, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    _dvc(ws, "push")
    shutil.rmtree(ws.root / "artifacts" / "experts")
    shutil.rmtree(ws.root / ".dvc" / "cache")
    _dvc(ws, "pull")
    from nds.formats.bundle import load_bundle

    assert load_bundle(ws.stage_dir("experts"))["k"] == 7
