"""Incremental index: a registered source is extracted from its originals, clustered on its own and
gets its own experts; every other source's shards and experts are reused byte-identical."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nds.config import Workspace
from nds.corpus.registry import add_source, remove_source
from nds.index.stages import run_stage

PARAMS = {
    "extract": {"extractor": "efficientnet_lite0", "image_size": 32, "batch_size": 64, "weights": None,
                "loader_workers": 0},
    "cluster": {"method": "source-kmeans", "target_size": 150, "pca_dim": 16, "seed": 0},
    "train_experts": {"arch": "rotnet_small", "epochs": 1, "max_steps": 4, "batch_size": 32, "lr": 0.004,
                      "val_fraction": 0.2, "workers": 1, "seed": 0},
    "compute_weights": {"scheme": "inverse_cluster_size"},
}


def write_images(folder: Path, images: list[np.ndarray], labels: list[str]) -> Path:
    """An ImageFolder of PNG files (the originals a source is registered from)."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        path = folder / label / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return folder


def _index(ws: Workspace) -> dict:
    return {stage: run_stage(stage, ws, progress=False)
            for stage in ("extract", "cluster", "train_experts", "compute_weights")}


def _expert_hashes(ws: Workspace) -> dict[str, str]:
    bundle = json.loads((ws.stage_dir("experts") / "bundle.json").read_text())
    clusters = json.loads((ws.stage_dir("cluster") / "clusters.json").read_text())
    return {clusters["names"][e["expert"]]: e["sha256"] for e in bundle["experts"]}


@pytest.fixture(scope="module")
def incremental(tmp_path_factory, tiny_corpus_dir):
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path_factory.mktemp("incremental"), PARAMS)
    shutil.copytree(tiny_corpus_dir, ws.data_dir)
    before = _index(ws)
    hashes_before = _expert_hashes(ws)
    rng = np.random.default_rng(0)
    # An outside source of 160 images at 48 px: stripes of two colours, labelled by orientation.
    images, labels = [], []
    for i in range(160):
        im = np.full((48, 40, 3), 255, np.uint8)
        colour = rng.integers(0, 200, 3)
        if i % 2:
            im[:, ::6] = colour
        else:
            im[::6, :] = colour
        images.append(im)
        labels.append("vertical" if i % 2 else "horizontal")
    add_source(ws, "stripes", str(write_images(ws.root / "outside", images, labels)), progress=False, track=False)
    after = _index(ws)
    return ws, before, after, hashes_before, _expert_hashes(ws)


def test_a_new_source_reuses_every_other_shard_and_expert(incremental):
    ws, before, after, hashes_before, hashes_after = incremental
    extract = after["extract"]
    assert extract["shards_reused"] == before["extract"]["shards"]
    assert extract["samples_extracted"] == 160
    new = {n for n in hashes_after if n.startswith("stripes-")}
    assert new and len(hashes_after) == len(hashes_before) + len(new)
    for name, sha in hashes_before.items():
        assert hashes_after[name] == sha, name  # old experts' bytes unchanged
    bundle = json.loads((ws.stage_dir("experts") / "bundle.json").read_text())
    for e in bundle["experts"]:
        assert hashlib.sha256((ws.stage_dir("experts") / e["file"]).read_bytes()).hexdigest() == e["sha256"]


def test_the_new_rows_keep_their_links_and_decoded_pixels(incremental):
    from nds.index._artifacts import load_index_images, load_index_order

    ws, *_ = incremental
    index = load_index_order(ws)
    rows = np.flatnonzero(np.asarray(index.column("dataset").to_pylist()) == "stripes")
    assert len(rows) == 160
    uris = index.column("uri").take(rows).to_pylist()
    assert all(Path(u).is_file() and u.endswith(".png") for u in uris)
    images = load_index_images(ws, rows[:4], index)
    assert images.shape == (4, 32, 32, 3)
    # 48 x 40 letterboxed onto white: the side columns are white, the stripes are not.
    assert (images[:, :, 0] == 255).all() and (images[:, 8:24, 8:24] < 255).any()


def test_removing_the_source_drops_only_its_experts(incremental):
    ws, before, after, hashes_before, _ = incremental
    remove_source(ws, "stripes", track=False)
    again = _index(ws)
    assert again["extract"]["samples_extracted"] == 0
    assert _expert_hashes(ws) == hashes_before
    assert again["train_experts"]["index_version"] == before["train_experts"]["index_version"]
