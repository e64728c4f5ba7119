"""Stage `compute_weights`: per-sample expert weights into `artifacts/weights` and the warehouse.

w_k(x) = 1/|S_k| for the cluster k that holds x (hard assignment). Schemes are registered in
nds._registry.WEIGHT_SCHEMES (params.yaml `compute_weights.scheme`).
"""

from __future__ import annotations

import json
import logging
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nds._io import write_json
from nds._registry import WEIGHT_SCHEMES
from nds.config import Workspace
from nds.errors import InvalidInputError
from nds.formats.bundle import load_bundle
from nds.index._artifacts import load_assignments, load_index_order, read_json, require, stage_output
from nds.index.layout import build_cluster_layout, save_cluster_layout
from nds.params import Params
from nds.platform import warehouse

log = logging.getLogger(__name__)


@WEIGHT_SCHEMES.register("inverse_cluster_size")
def compute_inverse_cluster_size(assignments: np.ndarray, k: int) -> np.ndarray:
    """`assignments: (n,) int` in [0, k) -> `(n,) float64` weights; each cluster's weights sum to 1."""
    a = np.asarray(assignments)
    if a.ndim != 1:
        raise InvalidInputError(f"assignments must be 1-D, got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= k):
        raise InvalidInputError(f"assignments must lie in [0, {k}); got values in [{a.min()}, {a.max()}]")
    sizes = np.bincount(a, minlength=k)
    with np.errstate(divide="ignore"):
        inv = np.where(sizes > 0, 1.0 / np.maximum(sizes, 1), 0.0)
    return inv[a]


def compute_weights(assignments: np.ndarray, k: int, *, scheme: str = "inverse_cluster_size") -> np.ndarray:
    """Weights of `scheme` (unknown names: InvalidInputError listing the registered schemes)."""
    return WEIGHT_SCHEMES[scheme](assignments, k)


def _corpus_md5(ws: Workspace) -> str | None:
    import yaml

    path = ws.root / "data.dvc"
    if not path.exists():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def _git_rev(ws: Workspace) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def run_compute_weights(ws: Workspace, params: Params, *, stage_seconds: dict | None = None) -> dict:
    """w_k(x) = 1/|S_k| per sample, written to Parquet and loaded into the warehouse."""
    index = load_index_order(ws)
    assignments = load_assignments(ws)
    cl = read_json(ws.stage_dir("cluster") / "clusters.json")
    bundle = load_bundle(require(ws.stage_dir("experts"), "train_experts"))
    k = cl["k"]
    if bundle["k"] != k:
        raise InvalidInputError(f"the expert bundle has {bundle['k']} experts but clustering made {k}; "
                                "rerun train_experts")
    w = compute_weights(assignments, k, scheme=params.compute_weights.scheme)
    version = bundle["index_version"]
    weight_table = pa.table(
        {
            "sample_id": index.column("sample_id"),
            "dataset": index.column("dataset"),
            "label": index.column("label"),
            "expert": pa.array(assignments, pa.int32()),
            "weight": pa.array(w, pa.float64()),
        }
    )
    corpus = json.loads((ws.data_dir / "corpus.json").read_text()) if (ws.data_dir / "corpus.json").exists() else {}
    datasets = np.asarray(index.column("dataset").to_pylist())
    by_expert = {e["expert"]: e for e in bundle["experts"]}
    cluster_rows = []
    for c in range(k):
        mix = cl["dataset_mix"][c]
        top = max(mix, key=mix.get)
        cluster_rows.append(
            {
                "expert": c,
                "name": cl["names"][c],
                "size": cl["sizes"][c],
                "top_dataset": top,
                "top_dataset_share": mix[top] / cl["sizes"][c],
                "rotation_accuracy": by_expert[c]["rotation_accuracy"],
                "expert_sha256": by_expert[c]["sha256"],
            }
        )
    summary = {
        "index_version": version,
        "n_samples": index.num_rows,
        "n_datasets": int(len(np.unique(datasets))),
        "k": k,
        "nmi_dataset": cl["nmi_dataset"],
        "bundle_sha256": bundle["bundle_sha256"],
        "corpus_profile": corpus.get("profile"),
    }
    with stage_output(ws, "weights") as out:
        pq.write_table(weight_table, out / "weights.parquet")
        # Members grouped by cluster: lets the clustered sampler draw in O(K + B), not O(N).
        save_cluster_layout(build_cluster_layout(assignments, k), out / "layout")
        write_json(out / "weights.json", summary)
    warehouse.load_index_version(
        ws.warehouse_path,
        version_row={
            **summary,
            "params": params.model_dump(),
            "corpus_md5": _corpus_md5(ws),
            "git_rev": _git_rev(ws),
            "stage_seconds": stage_seconds,
        },
        samples=index.select(["sample_id", "dataset", "uri", "label", "split", "sha256"]),
        clusters=pa.Table.from_pylist(cluster_rows),
        weights=weight_table.select(["sample_id", "expert", "weight"]),
    )
    log.info("weights: %d samples, %d experts, index %s loaded into %s", index.num_rows, k, version, ws.warehouse_path)
    return summary
