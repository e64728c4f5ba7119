"""k-means at index scale: 1e6 x 256 float32 features on CPU, MiniBatchKMeans vs faiss-cpu.

    .venv/bin/python benchmarks/kmeans_scale.py                 # n = 1e6, dim 256, K = 100
    .venv/bin/python benchmarks/kmeans_scale.py --n 20000 --k 10

Synthetic features: a mixture of `--true-k` Gaussian blobs (so inertia differences mean
something). Baseline in the same run: nds.index.cluster.assign_kmeans as the index build
calls it (MiniBatchKMeans, n_init=3, max_iter=200). Also timed: MiniBatchKMeans with
n_init=1, and nds.index.cluster.assign_kmeans_faiss where faiss-cpu is installed. Inertia is
measured by one common routine on the same L2-normalised features the clusterers see.
Prints a markdown table and writes benchmarks/results/kmeans_scale.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from nds._registry import CLUSTERERS
from nds.index import cluster

RESULTS = Path(__file__).resolve().parent / "results" / "kmeans_scale.json"
INERTIA_CHUNK = 65536


def synthetic_features(n: int, dim: int, true_k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(true_k, dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, INERTIA_CHUNK):
        hi = min(n, lo + INERTIA_CHUNK)
        x[lo:hi] = centres[rng.integers(0, true_k, hi - lo)] + 0.7 * rng.standard_normal((hi - lo, dim), dtype=np.float32)
    return x


def inertia(x: np.ndarray, assignments: np.ndarray, k: int) -> float:
    """Sum of squared distances to each cluster's mean (centroids recomputed from the labels)."""
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, assignments, x)  # k x dim, fine at these sizes
    counts = np.bincount(assignments, minlength=k)
    means = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    total = 0.0
    for lo in range(0, len(x), INERTIA_CHUNK):
        d = x[lo : lo + INERTIA_CHUNK] - means[assignments[lo : lo + INERTIA_CHUNK]]
        total += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
    return total


def _minibatch_single(features, *, k, pca_dim=0, seed=0):
    from sklearn.cluster import MiniBatchKMeans

    x = cluster._prepare(features, pca_dim, seed)
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=cluster.KMEANS_BATCH, n_init=1,
                         max_iter=200).fit(x)
    return km.predict(x), km.cluster_centers_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=1e6)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--true-k", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    n = int(args.n)
    feats = synthetic_features(n, args.dim, args.true_k)
    prepared = cluster._prepare(feats, 0, 0)  # what every clusterer sees (pca_dim=0)

    candidates = {"MiniBatchKMeans n_init=3 (nds.assign_kmeans)": cluster.assign_kmeans,
                  "MiniBatchKMeans n_init=1": _minibatch_single}
    if hasattr(cluster, "assign_kmeans_faiss") and "kmeans-faiss" in CLUSTERERS:
        candidates["faiss-cpu Kmeans (nds.assign_kmeans_faiss)"] = cluster.assign_kmeans_faiss
    baseline_name = next(iter(candidates))
    rows = []
    for name, fn in candidates.items():
        t0 = time.perf_counter()
        labels, _ = fn(feats, k=args.k, pca_dim=0, seed=0)
        seconds = time.perf_counter() - t0
        labels = np.asarray(labels, dtype=np.int64)
        rows.append({"method": name, "seconds": seconds, "inertia": inertia(prepared, labels, args.k),
                     "clusters_used": int(np.unique(labels).size)})
        print(f"<!-- {name}: {seconds:.1f}s -->", flush=True)
    base = rows[0]
    for r in rows:
        r["speedup_vs_baseline"] = base["seconds"] / r["seconds"]
        r["inertia_ratio_vs_baseline"] = r["inertia"] / base["inertia"]

    print(f"\nk-means on {n:.0e} x {args.dim} float32, K={args.k}; baseline: {baseline_name}\n")
    print("| figure | ours (s) | baseline (s) | ratio (speed-up) | inertia ratio (ours / baseline) |")
    print("|---|---|---|---|---|")
    for r in rows[1:]:
        print(f"| {r['method']} | {r['seconds']:.1f} | {base['seconds']:.1f} | {r['speedup_vs_baseline']:.2f}x | "
              f"{r['inertia_ratio_vs_baseline']:.4f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "kmeans_scale", "n": n, "dim": args.dim, "k": args.k, "true_k": args.true_k,
        "baseline": baseline_name, "python": platform.python_version(), "machine": platform.machine(),
        "rows": rows,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
