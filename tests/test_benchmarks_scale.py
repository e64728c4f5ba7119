"""Smoke runs of the scale benchmarks at toy sizes (subprocess each), so they cannot rot."""

import json
import subprocess
import sys

from conftest import REPO


def _run(args, tmp_path):
    r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_selection_scale_smoke(tmp_path):
    out = tmp_path / "sel.json"
    text = _run([str(REPO / "benchmarks/selection_scale.py"), "--sizes", "2e4", "--clusters", "10",
                 "--fractions", "0.05", "--repeats", "1", "--exactness-seeds", "200",
                 "--workdir", str(tmp_path), "--out", str(out)], tmp_path)
    doc = json.loads(out.read_text())
    assert "| figure |" in text and doc["rows"][0]["ratio_vs_numpy-choice"] > 0
    assert set(doc["exactness"]) >= {"ordered_pairs_chi2_p", "top_cluster_count_ks_p"}


def test_index_scale_smoke(tmp_path):
    out = tmp_path / "index.json"
    text = _run([str(REPO / "benchmarks/index_scale.py"), "--stream-sizes", "512", "1024", "--real-n", "0",
                 "--weight-sizes", "1e4", "--k", "10", "--out", str(out)], tmp_path)
    doc = json.loads(out.read_text())
    assert "| figure |" in text and len(doc["stream"]) == 2 and doc["weights"][0]["seconds"] > 0


def test_kmeans_scale_smoke(tmp_path):
    out = tmp_path / "km.json"
    text = _run([str(REPO / "benchmarks/kmeans_scale.py"), "--n", "3000", "--dim", "16", "--k", "5", "--true-k", "5",
                 "--out", str(out)], tmp_path)
    doc = json.loads(out.read_text())
    assert "| figure |" in text and all(r["inertia"] > 0 for r in doc["rows"])


def test_client_scoring_smoke(tmp_path):
    out = tmp_path / "client.json"
    text = _run([str(REPO / "benchmarks/client_scoring.py"), "--k", "2", "--images", "40", "--classes", "2",
                 "--threads", "1", "--out", str(out)], tmp_path)
    doc = json.loads(out.read_text())
    assert "| figure |" in text and [r["mode"] for r in doc["rows"]] == ["rotation", "linear", "features", "combined"]
