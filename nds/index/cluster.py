"""Stage `cluster`: split the source into K parts (k-means on features, or the label partitions
of the paper) and write `artifacts/cluster`.

The methods are registered in nds._registry.CLUSTERERS (params.yaml `cluster.method`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import pyarrow as pa

from nds._io import write_json
from nds._registry import CLUSTERERS
from nds.config import Workspace
from nds.errors import InvalidInputError, NDSError
from nds.index._artifacts import load_index_order, require, stage_output
from nds.params import ClusterParams, Params

log = logging.getLogger(__name__)

#: MiniBatchKMeans batch: large enough for stable centroids, small enough to stream.
KMEANS_BATCH = 4096


def _prepare(features: np.ndarray, pca_dim: int, seed: int) -> np.ndarray:
    """L2-normalise (cosine geometry suits CNN features) and optionally PCA-reduce."""
    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if pca_dim and pca_dim < x.shape[1] and pca_dim < x.shape[0]:
        from sklearn.decomposition import PCA

        x = PCA(n_components=pca_dim, random_state=seed, svd_solver="randomized").fit_transform(x)
    return x.astype(np.float32, copy=False)


def _check_kmeans_input(features: np.ndarray, k: int) -> None:
    n = len(features)
    if k < 1:
        raise InvalidInputError(f"cluster.k must be >= 1, got {k}")
    if k > n:
        raise InvalidInputError(f"cluster.k={k} exceeds the {n} source samples; lower cluster.k in params.yaml")
    if not np.isfinite(features).all():
        raise NDSError("features contain NaN/inf; rerun the extract stage")


def assign_kmeans(features: np.ndarray, *, k: int, pca_dim: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means on `features: (n, dim)`; returns `(assignments (n,) int32, centroids (k, d) float32)`.

    Clusters are renumbered by decreasing size (ties by first member) so expert ids are stable
    and readable; every cluster is non-empty.
    """
    _check_kmeans_input(features, k)
    labels, centroids = _minibatch_kmeans(_prepare(features, pca_dim, seed), k, seed)
    return _renumber(labels, centroids)


def _minibatch_kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(
        n_clusters=k, random_state=seed, batch_size=min(KMEANS_BATCH, len(x)), n_init=3, max_iter=200
    ).fit(x)
    return km.predict(x), km.cluster_centers_.astype(np.float32)


def allocate_clusters(group_sizes: np.ndarray, k: int) -> np.ndarray:
    """Split `k` clusters over groups in proportion to their sizes.

    Every non-empty group gets at least one cluster and none more clusters than members; the
    rest go one at a time to the group furthest below its share k * size / total. Returns
    (g,) int64 summing to k when 1 <= (non-empty groups) <= k <= (members).
    """
    sizes = np.asarray(group_sizes, dtype=np.int64)
    nonempty = sizes > 0
    target = min(max(k, int(nonempty.sum())), int(sizes.sum()))
    quota = k * sizes / max(int(sizes.sum()), 1)
    alloc = np.minimum(np.where(nonempty, np.maximum(np.floor(quota), 1), 0), sizes).astype(np.int64)
    while alloc.sum() > target:  # the one-cluster minimum overshot k: take from the best-served
        room = np.flatnonzero(alloc > 1)
        alloc[room[np.argmin(quota[room] - alloc[room])]] -= 1
    while alloc.sum() < target:
        room = np.flatnonzero(alloc < sizes)
        alloc[room[np.argmax(quota[room] - alloc[room])]] += 1
    return alloc


def assign_kmeans_within(features: np.ndarray, groups: np.ndarray, *, k: int, pca_dim: int = 0,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """k-means inside each group (source dataset), K split over the groups by size.

    No cluster straddles two source datasets, so an expert -- and a selection's weight on it --
    stays within one domain. Features are normalised and PCA-reduced once for all groups, so
    the centroids share one space. Returns (assignments, centroids, the group of each cluster).
    """
    groups = np.asarray(groups, dtype=object).astype(str)
    names, codes = np.unique(groups, return_inverse=True)
    if k < len(names):
        raise InvalidInputError(f"cluster.k={k} is below the {len(names)} source datasets; method dataset-kmeans "
                                f"needs k >= {len(names)} (one cluster per dataset at least)")
    _check_kmeans_input(features, k)
    x = _prepare(features, pca_dim, seed)
    alloc = allocate_clusters(np.bincount(codes, minlength=len(names)), k)
    labels = np.empty(len(x), dtype=np.int64)
    centroids = []
    for g in range(len(names)):
        members = np.flatnonzero(codes == g)
        if alloc[g] == 1:
            sub, cent = np.zeros(len(members), dtype=np.int64), x[members].mean(0, keepdims=True)
        else:
            sub, cent = _minibatch_kmeans(x[members], int(alloc[g]), seed)
        labels[members] = sum(len(c) for c in centroids) + sub
        centroids.append(cent)
    # _renumber drops any cluster k-means left empty and numbers the rest by size.
    assignments, cents = _renumber(labels, np.concatenate(centroids).astype(np.float32))
    first = np.unique(assignments, return_index=True)[1]
    return assignments, cents, [str(groups[i]) for i in first]


def clusters_per_source(sizes: np.ndarray, target_size: int) -> np.ndarray:
    """Clusters of each source under source-kmeans: round(n / target_size), at least 1, at most n."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.minimum(np.maximum(np.rint(sizes / target_size).astype(np.int64), 1), sizes)


def assign_kmeans_per_source(features: np.ndarray, groups: np.ndarray, *, target_size: int, pca_dim: int = 0,
                             seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """k-means inside each source on its own: its own normalisation, PCA and K (``clusters_per_source``).

    A source's clusters depend only on its own features, so adding or removing another source
    leaves them (and their experts) as they were. Returns (assignments, the name of each cluster,
    ``<source>-<j>`` with j by decreasing size inside the source).
    """
    groups = np.asarray(groups, dtype=object).astype(str)
    names, codes = np.unique(groups, return_inverse=True)
    if not np.isfinite(features).all():
        raise NDSError("features contain NaN/inf; rerun the extract stage")
    alloc = clusters_per_source(np.bincount(codes, minlength=len(names)), target_size)
    labels = np.empty(len(groups), dtype=np.int64)
    cluster_names: list[str] = []
    for g, name in enumerate(names):
        members = np.flatnonzero(codes == g)
        if alloc[g] == 1:
            sub = np.zeros(len(members), dtype=np.int64)
        else:
            x = _prepare(np.asarray(features[members]), pca_dim, seed)
            sub, _ = _renumber(*_minibatch_kmeans(x, int(alloc[g]), seed))
        labels[members] = len(cluster_names) + sub
        cluster_names += [f"{name}-{j}" for j in range(int(sub.max()) + 1)]
    return labels.astype(np.int32), cluster_names


#: faiss k-means: Lloyd iterations, and how many points per centroid it trains on (faiss
#: subsamples above this; 1024 keeps 1e6 x 256 under a minute on 2 cores for K <= 100 while
#: the final assignment still covers every sample).
FAISS_NITER = 25
FAISS_MAX_POINTS_PER_CENTROID = 1024


def assign_kmeans_faiss(features: np.ndarray, *, k: int, pca_dim: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means with faiss-cpu (full-batch Lloyd on a per-centroid sample); same contract as assign_kmeans."""
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - install hint
        raise NDSError("cluster method kmeans-faiss needs `pip install faiss-cpu`") from exc

    _check_kmeans_input(features, k)
    x = np.ascontiguousarray(_prepare(features, pca_dim, seed), dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=FAISS_NITER, nredo=1, seed=seed, verbose=False,
                      max_points_per_centroid=FAISS_MAX_POINTS_PER_CENTROID)
    km.train(x)
    _, labels = km.index.search(x, 1)
    return _renumber(labels[:, 0].astype(np.int64), km.centroids.astype(np.float32))


def _renumber(labels: np.ndarray, centroids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    used, first_idx, sizes = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first_idx, -sizes))  # biggest first, ties by first occurrence
    new_id = np.empty(used.max() + 1, dtype=np.int32)
    new_id[used[order]] = np.arange(len(used), dtype=np.int32)
    cents = centroids[used[order]] if centroids is not None else np.zeros((len(used), 0), np.float32)
    return new_id[labels].astype(np.int32), cents


def assign_by_group(groups: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Partition by a label column (`groups: (n,) str`); returns (assignments, group name per cluster)."""
    names, labels = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    assignments, _ = _renumber(labels, None)
    order = np.empty(len(names), dtype=object)
    order[assignments] = names[labels]
    return assignments, [str(s) for s in order]


def compute_cluster_sizes(assignments: np.ndarray, k: int) -> np.ndarray:
    """(k,) int64 member count per cluster."""
    return np.bincount(np.asarray(assignments), minlength=k).astype(np.int64)


def compute_nmi(assignments: np.ndarray, groups: np.ndarray) -> float:
    """Normalized mutual information between clusters and a grouping (e.g. domain)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(groups).astype(str), assignments))


#: method -> (features, datasets, labels, params) -> (assignments, centroids-or-None, names)
ClusterFn = Callable[[np.ndarray, np.ndarray, np.ndarray, ClusterParams], tuple]


def _kmeans(features, datasets, labels, p: ClusterParams):
    a, c = assign_kmeans(features, k=p.k, pca_dim=p.pca_dim, seed=p.seed)
    return a, c, [f"kmeans-{i}" for i in range(len(c))]


def _kmeans_faiss(features, datasets, labels, p: ClusterParams):
    a, c = assign_kmeans_faiss(features, k=p.k, pca_dim=p.pca_dim, seed=p.seed)
    return a, c, [f"kmeans-{i}" for i in range(len(c))]


def _kmeans_within_dataset(features, datasets, labels, p: ClusterParams):
    a, c, owners = assign_kmeans_within(features, datasets, k=p.k, pca_dim=p.pca_dim, seed=p.seed)
    return a, c, [f"{o}-kmeans-{i}" for i, o in enumerate(owners)]


def _kmeans_per_source(features, datasets, labels, p: ClusterParams):
    if p.target_size is None:
        raise InvalidInputError("cluster.method source-kmeans needs cluster.target_size (samples per cluster, "
                                "e.g. 1000) in params.yaml")
    a, names = assign_kmeans_per_source(features, datasets, target_size=p.target_size, pca_dim=p.pca_dim, seed=p.seed)
    return a, None, names


def _by_dataset(features, datasets, labels, p: ClusterParams):
    a, names = assign_by_group(datasets)
    return a, None, names


def _by_label(features, datasets, labels, p: ClusterParams):
    a, names = assign_by_group(np.char.add(np.char.add(datasets.astype(str), ":"), labels.astype(str)))
    return a, None, names


CLUSTERERS["kmeans"] = _kmeans
CLUSTERERS["dataset-kmeans"] = _kmeans_within_dataset
CLUSTERERS["dataset"] = _by_dataset
CLUSTERERS["label"] = _by_label
CLUSTERERS["source-kmeans"] = _kmeans_per_source
try:  # optional: only offered where faiss-cpu is installed
    import faiss  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    CLUSTERERS["kmeans-faiss"] = _kmeans_faiss


def _column(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_pylist(), dtype=object)


def run_cluster(ws: Workspace, params: Params) -> dict:
    """Assign each source sample to one of K clusters: `assignments.npy (n,) int32`."""
    p = params.cluster
    feats = np.load(require(ws.stage_dir("extract") / "features.npy", "extract"), mmap_mode="r")
    index = load_index_order(ws)
    datasets, labels = _column(index, "dataset"), _column(index, "label")
    t0 = time.perf_counter()
    fn = CLUSTERERS[p.method]  # unknown names: guarded by params validation, InvalidInputError for direct callers
    assignments, centroids, names = fn(np.asarray(feats), datasets, labels, p)
    seconds = time.perf_counter() - t0
    k = len(names)
    sizes = compute_cluster_sizes(assignments, k)
    mix = []
    for c in range(k):
        ds, counts = np.unique(datasets[assignments == c].astype(str), return_counts=True)
        mix.append({str(d): int(n) for d, n in zip(ds, counts)})
    summary = {
        "method": p.method,
        "k": k,
        "names": names,
        "sizes": sizes.tolist(),
        "dataset_mix": mix,
        "nmi_dataset": round(compute_nmi(assignments, datasets), 4),
        "seconds": round(seconds, 3),
    }
    with stage_output(ws, "cluster") as out:
        np.save(out / "assignments.npy", assignments.astype(np.int32))
        if centroids is not None:
            np.save(out / "centroids.npy", centroids)
        write_json(out / "clusters.json", summary)
    log.info("cluster: k=%d, sizes %d..%d, NMI(domain)=%.3f", k, sizes.min(), sizes.max(), summary["nmi_dataset"])
    return summary
