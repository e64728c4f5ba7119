"""Per-sample expert weights: w_k(x) = 1/|S_k| for the cluster k that holds x (hard assignment)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from nds.errors import NDSError


def compute_inverse_cluster_size(assignments: np.ndarray, k: int) -> np.ndarray:
    """`assignments: (n,) int` in [0, k) -> `(n,) float64` weights; each cluster's weights sum to 1."""
    a = np.asarray(assignments)
    if a.ndim != 1:
        raise NDSError(f"assignments must be 1-D, got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= k):
        raise NDSError(f"assignments must lie in [0, {k}); got values in [{a.min()}, {a.max()}]")
    sizes = np.bincount(a, minlength=k)
    with np.errstate(divide="ignore"):
        inv = np.where(sizes > 0, 1.0 / np.maximum(sizes, 1), 0.0)
    return inv[a]


#: Weighting schemes by name (params.yaml compute_weights.scheme).
WEIGHT_SCHEMES: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "inverse_cluster_size": compute_inverse_cluster_size,
}


def compute_weights(assignments: np.ndarray, k: int, *, scheme: str = "inverse_cluster_size") -> np.ndarray:
    try:
        fn = WEIGHT_SCHEMES[scheme]
    except KeyError:
        raise NDSError(f"unknown weight scheme {scheme!r}; choose one of {sorted(WEIGHT_SCHEMES)}") from None
    return fn(assignments, k)
