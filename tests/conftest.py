"""Shared fixtures: offline settings, a Prefect test server, and one tiny indexed workspace.

The tiny workspace is built once per session (corpus `tiny`, the real extractor, small
training budgets) and copied by tests that change it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Before Prefect is imported anywhere: no analytics, a private home, a patient server start.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="nds-prefect-home-"))
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("NDS_SOURCES", str(REPO / ".sources"))
os.environ.pop("NDS_ROOT", None)
os.environ.pop("NDS_WAREHOUSE", None)

import pytest  # noqa: E402
import yaml  # noqa: E402

from nds.config import Workspace  # noqa: E402

#: Small budgets so the whole tiny index builds in well under a minute on 2 cores.
TINY_PARAMS = {
    "extract": {"extractor": "efficientnet_lite0", "image_size": 64, "batch_size": 128, "weights": None},
    "cluster": {"method": "kmeans", "k": 7, "pca_dim": 0, "seed": 0},
    "train_experts": {"arch": "rotnet_small", "epochs": 3, "max_steps": 25, "batch_size": 64, "lr": 0.004,
                      "val_fraction": 0.2, "workers": 2, "seed": 0},
    "compute_weights": {"scheme": "inverse_cluster_size"},
}


def make_workspace(dst: Path, params: dict = TINY_PARAMS) -> Workspace:
    """A DVC workspace like the repository: dvc.yaml, params.yaml and the code stages depend on."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml",):
        shutil.copy(REPO / name, dst / name)
    for folder in ("nds", "warehouse"):
        shutil.copytree(REPO / folder, dst / folder, ignore=shutil.ignore_patterns("*.duckdb*", "__pycache__"))
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for args in (["init", "--no-scm", "-q"], ["config", "core.analytics", "false"], ["config", "core.check_update", "false"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=dst, env=env, check=True, capture_output=True)
    return Workspace(dst.resolve())


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    from nds.corpus.build import build_corpus

    ws = Workspace(tmp_path_factory.mktemp("tiny-corpus"))
    build_corpus(ws, "tiny", progress=False)
    return ws.data_dir


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, tiny_corpus_dir, prefect_server):
    """A workspace with the tiny corpus, indexed by `nds index` (the Prefect `index` flow)."""
    import json

    from flows.cli import main

    ws = make_workspace(tmp_path_factory.mktemp("tiny-index"))
    shutil.copytree(tiny_corpus_dir, ws.data_dir)
    assert main(["--root", str(ws.root), "-q", "index", "--profile", "tiny"]) == 0
    return ws, json.loads((ws.artifacts_dir / "index_summary.json").read_text())
