"""`git clone` + `dvc pull` reproduce an index that includes a registered outside source.

A git + DVC workspace (the tiny packaged corpus, plus `nds source add` of an ImageFolder of PNGs
written here, outside the workspace) is indexed by `dvc repro` and pushed to an S3 remote (moto
on loopback). A clone of the git repository into another folder, with no cache of its own, pulls
from the remote alone and gets the same index version, a clean `dvc status`, and a selection whose
manifest has the same sha256 for the same seed. Only the source's catalog is versioned: the clone
reads the PNGs at the uris it names, where the first workspace read them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import REPO, TINY_PARAMS
from flows.cli import main as nds_main
from nds.config import Workspace
from nds.corpus.read import load_images_at
from nds.formats.bundle import load_bundle
from nds.formats.scores import write_scores
from nds.platform import dvc
from nds.platform.dvc import dvc_env

from s3fixtures import BUCKET, s3_server  # noqa: F401  (fixture)

#: The tiny budgets, with fewer expert steps: this test is about versioning, not about experts.
PARAMS = {**TINY_PARAMS, "train_experts": {**TINY_PARAMS["train_experts"], "epochs": 1, "max_steps": 5}}
GIT = ["git", "-c", "user.name=nds-test", "-c", "user.email=nds-test@localhost", "-c", "init.defaultBranch=main"]
COLOURS = ("red", "blue")


def _run(cwd: Path, *cmd: str) -> str:
    r = subprocess.run(list(cmd), cwd=cwd, env=dvc_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stdout}{r.stderr}"
    return r.stdout + r.stderr


def _dvc(cwd: Path, *args: str) -> str:
    return _run(cwd, sys.executable, "-m", "dvc", *args)


def _photos(folder: Path) -> Path:
    """An ImageFolder of 2 classes x 12 PNGs (one tint per class, so they cluster)."""
    rng = np.random.default_rng(7)
    for c, colour in enumerate(COLOURS):
        (folder / colour).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 96, (32, 32, 3), dtype=np.uint8)
            pixels[..., 0 if c == 0 else 2] += 150
            Image.fromarray(pixels).save(folder / colour / f"{i:02d}.png")
    return folder


def _select(root: Path, scores: Path, out: Path) -> dict:
    assert nds_main(["--root", str(root), "-q", "select", "--scores", str(scores), "--budget", "0.1", "--seed", "5",
                     "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture
def workspace(tmp_path, tiny_corpus_dir, s3_server):
    """A git repository like this one: code, dvc.yaml, params, the tiny corpus, an S3 default remote."""
    root = tmp_path / "server"
    root.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("nds", "warehouse"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("*.duckdb*", "__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    _run(root, *GIT, "init", "-q")
    ws = Workspace(root)
    dvc.init_repo(ws)
    _dvc(root, "remote", "add", "-d", "store", f"s3://{BUCKET}/{tmp_path.name}/dvc")
    _dvc(root, "remote", "modify", "store", "endpointurl", s3_server)
    shutil.copytree(tiny_corpus_dir, ws.data_dir)
    return ws


def test_clone_and_pull_reproduce_an_index_with_a_registered_source(workspace, tmp_path):
    ws, root = workspace, workspace.root
    photos = _photos(tmp_path / "photos")  # outside the repository: never copied, never pushed
    assert nds_main(["--root", str(root), "-q", "source", "add", "photos", "--from", str(photos)]) == 0
    assert (root / "data.dvc").exists(), "registration re-tracks data/ in a DVC workspace"
    _dvc(root, "repro")
    _dvc(root, "push")
    _run(root, *GIT, "add", "-A")
    _run(root, *GIT, "commit", "-q", "-m", "index with photos")
    tracked = _run(root, "git", "ls-files").split()
    assert "data.dvc" in tracked and "dvc.lock" in tracked
    assert not any(p.startswith(("data/", "artifacts/")) or p.endswith(".duckdb") for p in tracked)

    bundle = load_bundle(ws.stage_dir("experts"), verify=False)
    index = pq.read_table(ws.stage_dir("extract") / "index.parquet", columns=["sample_id"]).column(0).to_pylist()
    assert sum(s.startswith("photos/") for s in index) == 2 * 12, "the registered source is in the index"
    scores = tmp_path / "scores.json"
    k = int(bundle["k"])
    write_scores(scores, bundle=bundle, mode="rotation", scores=[0.2 + 0.1 * i for i in range(k)],
                 seconds_per_expert=[0.0] * k)
    original = _select(root, scores, tmp_path / "sel-a")

    clone = tmp_path / "clone"
    _run(tmp_path, *GIT, "clone", "-q", str(root), str(clone))
    assert not (clone / "data").exists() and not (clone / "artifacts").exists()
    assert not (clone / ".dvc" / "cache").exists(), "the clone has no cache of its own yet"
    shutil.rmtree(root / ".dvc" / "cache")  # nothing local to fall back on: the S3 remote only
    _dvc(clone, "pull")
    assert "up to date" in _dvc(clone, "status")
    pulled = Workspace(clone)
    assert load_bundle(pulled.stage_dir("experts"), verify=True)["index_version"] == bundle["index_version"]

    again = _select(clone, scores, tmp_path / "sel-b")
    assert again["index_version"] == original["index_version"] == bundle["index_version"]
    assert again["manifest_sha256"] == original["manifest_sha256"]
    assert (tmp_path / "sel-b" / "manifest.parquet").read_bytes() == (tmp_path / "sel-a" / "manifest.parquet").read_bytes()

    # The clone's catalog names the PNGs where they are; they read back as registered.
    catalog = pq.read_table(clone / "data" / "sources" / "photos" / "catalog.parquet").to_pylist()
    assert {Path(r["uri"]).parent.parent for r in catalog} == {photos}
    for r in catalog:
        assert hashlib.sha256(Path(r["uri"]).read_bytes()).hexdigest() == r["sha256"]
    pixels = load_images_at(pulled.data_dir, [r["uri"] for r in catalog])
    assert pixels.shape[0] == len(catalog) == 2 * 12
