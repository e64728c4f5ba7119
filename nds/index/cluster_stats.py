"""Per-cluster reference features in the public extractor's space, shipped in the expert bundle.

The ``features`` scorer (``nds.client.scoring``) needs to know where each cluster lies in the
space of the extractor the index was built with (params.yaml ``extract.*``): a client embeds
its own images with that same public extractor and asks which clusters its images sit among.
The bundle therefore carries, under ``cluster_stats``, a **reference sample** of every cluster:

- up to ``PER_CLUSTER`` members per cluster (evenly spaced over its members in index order;
  at most ``MAX_ROWS`` in all, so a large K gets fewer per cluster), each the member's
  L2-normalised extractor feature (all ``F`` dimensions, no projection), stored as int8 with
  one float32 scale per row;
- the cluster of every reference row, the size of every cluster and ``neighbours``, the k of
  the client's k-nearest-neighbour vote.

A client image votes for the clusters of its ``neighbours`` most cosine-similar reference
rows, each vote weighted by 1 / (its cluster's reference rows): equal priors, so a cluster
gains nothing from its size (``ClusterStats.votes``). Chosen by measurement over Gaussian
per-cluster statistics (format 1: mean + diagonal variance after a 64-d PCA): a Gaussian with
a broad spread (a mixed clip-art cluster) explains every image from an unseen collection best,
so seven-segment digits went to clip art (related-domain share 0.00); the nearest members
find the digits (0.99), with the same in-domain precision (benchmarks/cross_domain.py).

Size: ``rows * (F + 4)`` bytes + base64: ~2.4 MB in bundle.json at K = 22 (64 rows each, F = 1280).
The rows are features of public source images the index links to anyway; none is a client's.
Made from the ``extract`` and ``cluster`` stage outputs (``bundle_cluster_stats``); read on the
client by ``ClusterStats.from_bundle``. Reads only the reference rows of the features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from nds.config import Workspace
from nds.errors import InvalidInputError
from nds.formats.bundle import pack_array, unpack_array

log = logging.getLogger(__name__)

STATS_FORMAT = 2
#: Reference rows per cluster. Measured on the small index (22 clusters, 3 seeds, 5 % selections):
#: 50 / 100 / 200 rows gave the same in-domain precision (1.00) and 1.00 / 0.99 / 1.00 on the
#: seven-segment digits; 64 keeps bundle.json at ~2.4 MB.
PER_CLUSTER = 64
#: At most this many rows in all (~28 MB in bundle.json at F = 1280): K = 1,000 keeps 16 each.
MAX_ROWS = 16384
#: Neighbours per client image: 1 neighbour was noisy (0.70 on the digits above), 5-20 alike.
NEIGHBOURS = 10
#: Client images per similarity block: (block x rows) float32 stays ~64 MB at MAX_ROWS.
BLOCK = 1024


@dataclass(frozen=True)
class ClusterStats:
    """The reference sample of one index. reference: (R, F) int8 and scale: (R,) float32 (the
    L2-normalised feature is reference * scale); cluster: (R,) int64 in [0, K); cluster_size: (K,)
    int64. extractor and image_size name the public extractor and its input size."""

    extractor: str
    image_size: int
    reference: np.ndarray
    scale: np.ndarray
    cluster: np.ndarray
    cluster_size: np.ndarray
    neighbours: int = NEIGHBOURS

    @property
    def k(self) -> int:
        return len(self.cluster_size)

    def votes(self, features: np.ndarray) -> np.ndarray:
        """(n, K) float64, each row summing to 1: the cluster votes of each image's nearest reference rows.

        features: (n, F) raw extractor output (L2-normalised here, like the reference).
        """
        x = np.asarray(features, dtype=np.float32)
        f = self.reference.shape[1]
        if x.ndim != 2 or x.shape[1] != f:
            raise InvalidInputError(f"features must be (n, {f}) from {self.extractor}, got {x.shape}")
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        ref = self.reference.astype(np.float32) * self.scale[:, None]
        per_row = 1.0 / np.bincount(self.cluster, minlength=self.k)[self.cluster]  # equal priors
        m = min(self.neighbours, len(ref))
        out = np.zeros((len(x), self.k))
        for s in range(0, len(x), BLOCK):
            sim = x[s:s + BLOCK] @ ref.T
            # the m most similar rows; ties broken by row order (stable), so scores are deterministic
            near = np.argsort(-sim, axis=1, kind="stable")[:, :m]
            rows = np.repeat(np.arange(len(near)), m)
            np.add.at(out[s:s + BLOCK], (rows, self.cluster[near].ravel()), per_row[near].ravel())
        return out / out.sum(axis=1, keepdims=True)

    def to_json(self) -> dict:
        return {
            "format": STATS_FORMAT, "extractor": self.extractor, "image_size": int(self.image_size),
            "normalise": "l2", "k": self.k, "neighbours": int(self.neighbours),
            "reference": pack_array(self.reference.astype(np.int8)),
            "scale": pack_array(self.scale.astype(np.float32)),
            "cluster": pack_array(self.cluster.astype(np.int32)),
            "cluster_size": [int(s) for s in self.cluster_size],
        }

    @classmethod
    def from_bundle(cls, bundle: dict) -> "ClusterStats":
        """The reference sample in a loaded bundle.json; InvalidInputError naming the fix if absent or malformed."""
        doc = bundle.get("cluster_stats")
        if not isinstance(doc, dict):
            raise InvalidInputError(
                "this expert bundle has no cluster_stats (made before the features scorer existed): "
                "fetch a bundle of a newer index, or use --mode rotation / linear / logme")
        if doc.get("format") != STATS_FORMAT:
            raise InvalidInputError(
                f"bundle cluster_stats format {doc.get('format')!r} is not {STATS_FORMAT}: the bundle comes from "
                "another nds version; rebuild the index (`nds index`) or fetch a current bundle, or use "
                "--mode rotation / linear / logme")
        where = "bundle.json cluster_stats"
        try:
            neighbours = int(doc.get("neighbours", 0))
        except (TypeError, ValueError):
            neighbours = 0
        stats = cls(
            str(doc.get("extractor")), int(doc.get("image_size", 0)),
            unpack_array(doc.get("reference", {}), where), unpack_array(doc.get("scale", {}), where),
            unpack_array(doc.get("cluster", {}), where).astype(np.int64),
            np.asarray(doc.get("cluster_size", []), dtype=np.int64), neighbours,
        )
        k, r = bundle.get("k"), len(stats.cluster)
        if (stats.reference.ndim != 2 or len(stats.reference) != r or stats.scale.shape != (r,) or r == 0
                or stats.cluster_size.shape != (k,) or neighbours < 1 or stats.cluster.min() < 0
                or stats.cluster.max() >= k or len(np.unique(stats.cluster)) != k):
            raise InvalidInputError(f"{where} does not match the bundle's {k} experts; fetch the bundle again")
        return stats


def reference_rows(assignments: np.ndarray, k: int, *, per_cluster: int = PER_CLUSTER,
                   max_rows: int = MAX_ROWS) -> np.ndarray:
    """Sorted (R,) int64 positions: up to ``min(per_cluster, max_rows // k)`` (at least 1) evenly spaced
    members of every cluster, in index order. Deterministic."""
    per = max(1, min(per_cluster, max_rows // max(k, 1)))
    order = np.argsort(assignments, kind="stable")
    starts = np.searchsorted(assignments[order], np.arange(k + 1))
    picked = []
    for c in range(k):
        members = order[starts[c]:starts[c + 1]]
        picked.append(members[np.unique(np.linspace(0, len(members) - 1, min(per, len(members))).round()
                                        .astype(np.int64))])
    return np.sort(np.concatenate(picked))


def compute_cluster_stats(features: np.ndarray, assignments: np.ndarray, *, k: int, extractor: str,
                          image_size: int, per_cluster: int = PER_CLUSTER, max_rows: int = MAX_ROWS,
                          neighbours: int = NEIGHBOURS) -> ClusterStats:
    """The reference sample of ``features: (n, F)`` (float16/32, may be a memmap) grouped by
    ``assignments: (n,) int`` in [0, k). Reads only the chosen rows. Deterministic."""
    n = len(features)
    a = np.asarray(assignments, dtype=np.int64)
    if a.shape != (n,) or n == 0:
        raise InvalidInputError(f"assignments {a.shape} do not match features {features.shape}: rerun the cluster stage")
    if a.min() < 0 or a.max() >= k:
        raise InvalidInputError(f"assignments refer to clusters outside [0, {k}): rerun the cluster stage")
    size = np.bincount(a, minlength=k)
    if (size == 0).any():
        raise InvalidInputError(f"clusters {np.flatnonzero(size == 0).tolist()} are empty: rerun the cluster stage")
    if neighbours < 1:
        raise InvalidInputError(f"neighbours must be >= 1, got {neighbours}")
    rows = reference_rows(a, k, per_cluster=per_cluster, max_rows=max_rows)
    x = np.asarray(features[rows], dtype=np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    scale = np.maximum(np.abs(x).max(axis=1), 1e-12) / 127.0
    q = np.round(x / scale[:, None]).astype(np.int8)
    return ClusterStats(extractor, int(image_size), q, scale.astype(np.float32), a[rows], size.astype(np.int64),
                        int(neighbours))


def bundle_cluster_stats(ws: Workspace, **options) -> dict:
    """``bundle.json``'s ``cluster_stats`` for the workspace's extract + cluster stage outputs.

    What ``nds.index.experts.finish_experts`` adds: ``extra["cluster_stats"] = bundle_cluster_stats(ws)``.
    options: ``compute_cluster_stats``'s per_cluster / max_rows / neighbours.
    """
    import time

    from nds.index._artifacts import load_assignments, read_json, require

    t0 = time.perf_counter()
    info = read_json(ws.stage_dir("extract") / "extract.json")
    features = np.load(require(ws.stage_dir("extract") / "features.npy", "extract"), mmap_mode="r")
    k = int(read_json(ws.stage_dir("cluster") / "clusters.json")["k"])
    stats = compute_cluster_stats(features, load_assignments(ws), k=k, extractor=info["extractor"],
                                  image_size=int(info["image_size"]), **options)
    log.info("cluster stats: K %d, %d reference rows of %d dims, %.1fs", k, len(stats.cluster),
             stats.reference.shape[1], time.perf_counter() - t0)
    return stats.to_json()
