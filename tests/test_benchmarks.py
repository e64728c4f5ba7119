"""Smoke runs of the benchmark scripts at toy sizes, so they cannot rot."""

import json
import subprocess
import sys

from conftest import REPO


def _run(args, tmp_path, cwd=REPO):
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_selection_draw_smoke(tmp_path):
    out = tmp_path / "draw.json"
    text = _run([str(REPO / "benchmarks/selection_draw.py"), "--sizes", "2e4", "--clusters", "10", "--fractions", "0.05",
                 "--repeats", "1", "--out", str(out)], tmp_path)
    assert "| figure |" in text and json.loads(out.read_text())


def test_expert_training_smoke(tmp_path):
    out = tmp_path / "train.json"
    text = _run([str(REPO / "benchmarks/expert_training.py"), "--steps", "1", "--batch", "8", "--threads", "1",
                 "--out", str(out)], tmp_path)
    assert "ratio" in text and json.loads(out.read_text())["rows"][0]["ours_img_per_s"] > 0


def test_domain_precision_smoke(tiny_index, tmp_path):
    ws, _ = tiny_index
    out = tmp_path / "dp.json"
    text = _run([str(REPO / "benchmarks/domain_precision.py"), "--root", str(ws.root), "--modes", "rotation",
                 "--temperatures", "0.02", "--per-class", "2", "--max-classes", "3", "--seeds", "1",
                 "--out", str(out)], tmp_path)
    doc = json.loads(out.read_text())
    assert "| **mean** |" in text and len(doc["rows"]) == 7


def test_ingest_scale_smoke(tiny_corpus_dir, tmp_path):
    out = tmp_path / "ingest.json"
    text = _run([str(REPO / "benchmarks/ingest_scale.py"), "--root", str(tiny_corpus_dir.parent), "--sizes", "40",
                 "--kinds", "webdataset", "--batch", "16", "--loader-workers", "0", "--out", str(out)], tmp_path)
    row = json.loads(out.read_text())["rows"][0]
    assert "| N | location |" in text and row["registered"] == 40 and row["extract_img_s"] > 0
