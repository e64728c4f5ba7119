"""Helpers shared by the client tests: random images and a small real expert bundle."""

from pathlib import Path

import numpy as np

from nds.formats.bundle import write_bundle
from nds.models import experts


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_bundle(folder: Path, k: int = 2, *, index_version: str = "v-test", reference: bool = False) -> dict:
    """k untrained-ish experts (2 steps) and bundle.json in `folder`; with ``reference``, also the
    features scorer's ``cluster_stats`` (8 random reference rows per cluster, 32 px extractor input)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for e in range(k):
        model, metrics = experts.train_expert(rgb(32, 32, e)[None].repeat(8, 0), max_steps=2, batch_size=8, seed=e)
        name = f"expert_{e:03d}.pt"
        sha = experts.save_expert(model, folder / name, meta={"arch": "rotnet_small", "expert": e})
        entries.append({"expert": e, "file": name, "sha256": sha, **metrics})
    extra = None
    if reference:
        from nds.index.cluster_stats import compute_cluster_stats

        feats = np.random.default_rng(0).random((8 * k, 1280), dtype=np.float32)
        stats = compute_cluster_stats(feats, np.repeat(np.arange(k), 8), k=k, extractor="efficientnet_lite0",
                                      image_size=32)
        extra = {"cluster_stats": stats.to_json()}
    return write_bundle(folder, index_version=index_version, network=experts.bundle_fields("rotnet_small"),
                        experts=entries, extra=extra)
