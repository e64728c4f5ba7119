"""Per-cluster statistics in the public extractor's feature space, shipped in the expert bundle.

The ``features`` scorer (``nds.client.scoring``) needs to know where each cluster lies in the
space of the extractor the index was built with (params.yaml ``extract.*``): a client embeds
its own images with that same public extractor and asks which clusters explain them. The
bundle therefore carries, under ``cluster_stats``:

- the projection: features are L2-normalised, centred on the source mean and projected on the
  top ``dim`` principal axes of the whole source (computed here, independent of the cluster
  stage's own reduction);
- per cluster: the mean and the diagonal variance of its members' projected features, and its size.

That is ``1280 * dim + 2 * K * dim`` floats (float32, base64 in bundle.json): about 0.45 MB at
dim 64 and K 24. Nothing in it is a source image; the means are averages of hundreds of images.

Made from the ``extract`` and ``cluster`` stage outputs (``bundle_cluster_stats``); read on the
client by ``ClusterStats.from_bundle``. Streams the features in chunks: memory is flat in N.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from nds.config import Workspace
from nds.errors import InvalidInputError
from nds.formats.bundle import pack_array, unpack_array

log = logging.getLogger(__name__)

STATS_FORMAT = 1
#: Projected dimensions. 64 principal axes of the L2-normalised EfficientNet-Lite0 features keep
#: the domains apart (the cluster stage uses the same size) at 0.33 MB of projection.
STATS_DIM = 64
#: Rows per chunk while streaming the features (1280-d float64: ~80 MB at this size).
CHUNK_ROWS = 8192
#: The principal axes come from at most this many evenly spaced rows: the covariance of 8k
#: rows costs 13 GFLOP (~20 s on 2 busy cores) where all 22k of the small index took 120 s,
#: and the leading axes of a 1280-d covariance are stable at that sample size.
PCA_ROWS = 8192
#: Variance floor, as a share of the mean per-axis source variance: a small or tight cluster
#: must not claim near-infinite likelihood for images that happen to sit at its mean.
VAR_FLOOR = 0.05


@dataclass(frozen=True)
class ClusterStats:
    """The statistics of one index. mean: (F,); projection: (F, D); cluster_mean, cluster_var: (K, D);
    cluster_size: (K,) int64. extractor and image_size name the public extractor and its input size."""

    extractor: str
    image_size: int
    mean: np.ndarray
    projection: np.ndarray
    cluster_mean: np.ndarray
    cluster_var: np.ndarray
    cluster_size: np.ndarray

    @property
    def k(self) -> int:
        return len(self.cluster_mean)

    def project(self, features: np.ndarray) -> np.ndarray:
        """``features: (n, F)`` raw extractor output -> (n, D) float64 in the stats' space."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise InvalidInputError(f"features must be (n, {len(self.mean)}) from {self.extractor}, got {x.shape}")
        return (_l2_normalise(x) - self.mean) @ self.projection

    def log_likelihoods(self, features: np.ndarray) -> np.ndarray:
        """(n, K) float64: log density of each image under each cluster's diagonal Gaussian."""
        z = self.project(features)
        inv = 1.0 / self.cluster_var  # (K, D)
        # sum_d (z - mu)^2 / var, expanded into matrix products: no (n, K, D) intermediate.
        quad = (z * z) @ inv.T - 2.0 * z @ (self.cluster_mean * inv).T + (self.cluster_mean ** 2 * inv).sum(1)[None]
        return -0.5 * (quad + np.log(2 * np.pi * self.cluster_var).sum(1)[None])

    def to_json(self) -> dict:
        return {
            "format": STATS_FORMAT, "extractor": self.extractor, "image_size": int(self.image_size),
            "normalise": "l2", "dim": int(self.projection.shape[1]), "k": self.k,
            "mean": pack_array(self.mean.astype(np.float32)),
            "projection": pack_array(self.projection.astype(np.float32)),
            "cluster_mean": pack_array(self.cluster_mean.astype(np.float32)),
            "cluster_var": pack_array(self.cluster_var.astype(np.float32)),
            "cluster_size": [int(s) for s in self.cluster_size],
        }

    @classmethod
    def from_bundle(cls, bundle: dict) -> "ClusterStats":
        """The statistics in a loaded bundle.json; InvalidInputError naming the fix if absent or malformed."""
        doc = bundle.get("cluster_stats")
        if not isinstance(doc, dict):
            raise InvalidInputError(
                "this expert bundle has no cluster_stats (made before the features scorer existed): "
                "fetch a bundle of a newer index, or use --mode rotation / linear / logme")
        if doc.get("format") != STATS_FORMAT:
            raise InvalidInputError(f"bundle cluster_stats format {doc.get('format')!r} is not {STATS_FORMAT}; "
                                    "update nds to the version that made the bundle")
        where = "bundle.json cluster_stats"
        stats = cls(
            str(doc.get("extractor")), int(doc.get("image_size", 0)),
            unpack_array(doc.get("mean", {}), where).astype(np.float64),
            unpack_array(doc.get("projection", {}), where).astype(np.float64),
            unpack_array(doc.get("cluster_mean", {}), where).astype(np.float64),
            unpack_array(doc.get("cluster_var", {}), where).astype(np.float64),
            np.asarray(doc.get("cluster_size", []), dtype=np.int64),
        )
        f, d = stats.projection.shape if stats.projection.ndim == 2 else (-1, -1)
        k = bundle.get("k")
        if (stats.mean.shape != (f,) or stats.cluster_mean.shape != (k, d) or stats.cluster_var.shape != (k, d)
                or stats.cluster_size.shape != (k,) or not (stats.cluster_var > 0).all()):
            raise InvalidInputError(f"{where} does not match the bundle's {k} experts; fetch the bundle again")
        return stats


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _chunks(n: int):
    for start in range(0, n, CHUNK_ROWS):
        yield slice(start, min(start + CHUNK_ROWS, n))


def compute_cluster_stats(features: np.ndarray, assignments: np.ndarray, *, k: int, extractor: str,
                          image_size: int, dim: int = STATS_DIM) -> ClusterStats:
    """Statistics of ``features: (n, F)`` (float16/32, may be a memmap) grouped by ``assignments: (n,) int``.

    Two streaming passes: the mean and covariance of the L2-normalised features (of at most
    ``PCA_ROWS`` evenly spaced rows; -> the top ``dim`` principal axes), then every row's
    projection into its cluster's mean and variance along those axes. Deterministic.
    """
    n, f = features.shape
    a = np.asarray(assignments, dtype=np.int64)
    if a.shape != (n,) or n == 0:
        raise InvalidInputError(f"assignments {a.shape} do not match features {features.shape}: rerun the cluster stage")
    if a.min() < 0 or a.max() >= k:
        raise InvalidInputError(f"assignments refer to clusters outside [0, {k}): rerun the cluster stage")
    if not 1 <= dim <= f:
        raise InvalidInputError(f"cluster statistics dim must be in [1, {f}], got {dim}")
    rows = np.unique(np.linspace(0, n - 1, min(n, PCA_ROWS)).round().astype(np.int64))
    total, outer = np.zeros(f), np.zeros((f, f))
    for s in _chunks(len(rows)):
        x = _l2_normalise(np.asarray(features[rows[s]], dtype=np.float64))
        total += x.sum(0)
        outer += x.T @ x
    mean = total / len(rows)
    cov = outer / len(rows) - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)
    axes = eigvec[:, ::-1][:, :dim]
    axes *= np.where(axes[np.abs(axes).argmax(0), np.arange(dim)] < 0, -1.0, 1.0)  # a fixed sign per axis
    sums, squares = np.zeros((k, dim)), np.zeros((k, dim))
    for s in _chunks(n):
        z = (_l2_normalise(np.asarray(features[s], dtype=np.float64)) - mean) @ axes
        np.add.at(sums, a[s], z)
        np.add.at(squares, a[s], z * z)
    size = np.bincount(a, minlength=k)
    if (size == 0).any():
        raise InvalidInputError(f"clusters {np.flatnonzero(size == 0).tolist()} are empty: rerun the cluster stage")
    cmean = sums / size[:, None]
    cvar = np.maximum(squares / size[:, None] - cmean ** 2, 0.0)
    floor = VAR_FLOOR * float(np.clip(eigval[::-1][:dim], 0, None).mean())
    return ClusterStats(extractor, int(image_size), mean, axes, cmean, cvar + floor, size.astype(np.int64))


def bundle_cluster_stats(ws: Workspace, *, dim: int = STATS_DIM) -> dict:
    """``bundle.json``'s ``cluster_stats`` for the workspace's extract + cluster stage outputs.

    What ``nds.index.experts.finish_experts`` adds: ``extra["cluster_stats"] = bundle_cluster_stats(ws)``.
    """
    import time

    from nds.index._artifacts import load_assignments, read_json, require

    t0 = time.perf_counter()
    info = read_json(ws.stage_dir("extract") / "extract.json")
    features = np.load(require(ws.stage_dir("extract") / "features.npy", "extract"), mmap_mode="r")
    k = int(read_json(ws.stage_dir("cluster") / "clusters.json")["k"])
    stats = compute_cluster_stats(features, load_assignments(ws), k=k, extractor=info["extractor"],
                                  image_size=int(info["image_size"]), dim=dim)
    log.info("cluster stats: K %d, %d -> %d dims, %.1fs", k, features.shape[1], dim, time.perf_counter() - t0)
    return stats.to_json()
