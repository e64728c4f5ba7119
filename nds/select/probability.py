"""Expert scores -> sampling probabilities, and the budget of a draw.

NDS (Yan, Acuna, Fidler, CVPR 2020) maps the K scores a client uploads to a
distribution over the N source samples:

    a = softmax(z / T)                                  expert weights, (K,)
    p(x) = sum_k a_k w_k(x) = a_c(x) / |S_c(x)|         hard clusters: w_k = 1/|S_k| on S_k

The samplers (nds.select.samplers) then draw the budget from it without replacement.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from nds.errors import InvalidInputError

# float64 pairwise summation of 1e8 probabilities drifts by ~1e-10 relative; a sum
# further than this from 1 is a caller bug (unnormalised weights), not rounding.
PROBABILITY_SUM_TOLERANCE = 1e-6


# --------------------------------------------------------------------------- weights


def compute_expert_weights(scores, *, temperature: float) -> np.ndarray:
    """Softmax of the client's expert scores: `a = softmax(z / T)`.

    scores: (K,) float array-like, one score per expert (higher = more useful).
    temperature: T > 0. T -> 0 puts all weight on the best expert(s);
        T -> inf tends to uniform over experts.
    Returns (K,) float64, non-negative, sums to 1.
    """
    try:
        z = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"scores must be a list of K numbers, got {scores!r:.80}") from exc
    if z.ndim != 1 or z.size == 0:
        raise InvalidInputError(
            f"scores must be a non-empty 1-D list of K numbers (one per expert), got shape {z.shape}"
        )
    if not np.isfinite(z).all():
        bad = np.flatnonzero(~np.isfinite(z))[:5].tolist()
        raise InvalidInputError(
            f"scores contain NaN or infinite values at positions {bad}: "
            "re-run the client scoring; every expert needs a finite score"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise InvalidInputError(f"temperature must be a positive number, got {temperature!r}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise InvalidInputError(f"temperature must be a finite number > 0, got {temperature!r} (e.g. 0.1)")
    # Shift by the max so the largest exponent is exp(0): no overflow for any T.
    with np.errstate(over="ignore", under="ignore"):
        shifted = (z - z.max()) / t
        e = np.exp(shifted)
    return e / e.sum()


def compute_sample_probabilities(
    assignments,
    expert_weights,
    *,
    cluster_sizes=None,
    eligible=None,
) -> np.ndarray:
    """Per-sample probability `p(x) = a_c(x) / |S_c(x)|`, renormalised over eligible samples.

    assignments: (N,) int, cluster (expert) id of each sample, in [0, K).
    expert_weights: (K,) float, non-negative (e.g. from compute_expert_weights).
    cluster_sizes: (K,) int or None; |S_k| as stored with the index. None counts
        them from `assignments`.
    eligible: (N,) bool or None; False removes a sample (dataset filter, exclusion).
    Returns (N,) float64 summing to 1; ineligible samples get exactly 0, and all
    eligible members of one cluster get the bitwise-same value. The weight of
    experts whose cluster has no eligible member is dropped and the rest renormalised.
    """
    a = as_assignments(assignments)
    w = np.asarray(expert_weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise InvalidInputError(f"expert_weights must be a non-empty (K,) array, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise InvalidInputError("expert_weights must be finite, non-negative and not all zero (use compute_expert_weights)")
    k = w.size
    if a.size and a.max() >= k:
        raise InvalidInputError(
            f"assignments refer to cluster {int(a.max())} but there are only {k} expert weights: "
            "the scores and the index have different K (use the scores made for this index version)"
        )
    counted = np.bincount(a, minlength=k)
    if cluster_sizes is None:
        sizes = counted
    else:
        sizes = np.asarray(cluster_sizes)
        if sizes.shape != (k,) or not np.issubdtype(sizes.dtype, np.integer) or (sizes < 0).any():
            raise InvalidInputError(f"cluster_sizes must be ({k},) non-negative integers, got shape {sizes.shape}")
        empty_but_used = (sizes == 0) & (counted > 0)
        if empty_but_used.any():
            raise InvalidInputError(
                f"cluster_sizes says cluster {int(np.flatnonzero(empty_but_used)[0])} is empty "
                "but samples are assigned to it: sizes and assignments come from different index versions"
            )
    if eligible is None:
        n_eligible = counted
    else:
        mask = np.asarray(eligible)
        if mask.dtype != np.bool_ or mask.shape != a.shape:
            raise InvalidInputError(f"eligible must be a ({a.size},) bool mask, got {mask.dtype} {mask.shape}")
        n_eligible = np.bincount(a[mask], minlength=k)
    # Normalise per cluster (K values) rather than per sample, so members stay identical.
    p = compute_member_probabilities(w, sizes, n_eligible)[a]
    if eligible is not None:
        p[~mask] = 0.0
    return p


def compute_member_probabilities(expert_weights, cluster_sizes, eligible_counts=None) -> np.ndarray:
    """(K,) float64 probability of one eligible member of each cluster: p(x) = out[a(x)].

    The same numbers compute_sample_probabilities gives every eligible member, in O(K):
    cluster_sizes (K,) int |S_k| as stored with the index; eligible_counts (K,) int
    eligible members per cluster (None: all). Clusters with no eligible member get 0.
    """
    w = np.asarray(expert_weights, dtype=np.float64)
    sizes = np.asarray(cluster_sizes)
    if w.ndim != 1 or w.size == 0:
        raise InvalidInputError(f"expert_weights must be a non-empty (K,) array, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise InvalidInputError("expert_weights must be finite, non-negative and not all zero (use compute_expert_weights)")
    k = w.size
    if sizes.shape != (k,) or not np.issubdtype(sizes.dtype, np.integer) or (sizes < 0).any():
        raise InvalidInputError(
            f"cluster_sizes must be ({k},) non-negative integers (one per expert weight), got {sizes.dtype} {sizes.shape}: "
            "the scores and the index have different K"
        )
    n_eligible = sizes if eligible_counts is None else np.asarray(eligible_counts)
    if n_eligible.shape != (k,) or (n_eligible < 0).any() or (n_eligible > sizes).any():
        raise InvalidInputError(f"eligible_counts must be ({k},) integers between 0 and the cluster sizes")
    per_member = np.divide(w, sizes, out=np.zeros(k), where=sizes > 0)
    total = float(per_member @ n_eligible)
    if not total > 0:
        raise InvalidInputError(
            "no eligible sample has positive probability: every eligible sample sits in a cluster "
            "whose expert weight is 0 (raise the temperature or loosen the dataset filter)"
        )
    return np.where(n_eligible > 0, per_member / total, 0.0)


# --------------------------------------------------------------------------- budget


def budget_from_number(value: int | float) -> int | float:
    """A budget given as one number (the CLI, the select form, an HTTP body, an evaluation).

    A whole number >= 1 (500, 500.0, 1.0) is a count; anything below 1 is a fraction, left for
    resolve_budget to check; 1.5 is neither and refused here.
    """
    if isinstance(value, Real) and not isinstance(value, Integral) and math.isfinite(value) and value >= 1:
        if value != int(value):
            raise InvalidInputError(f"budget {value:g} is neither a whole count nor a fraction below 1: use e.g. 500 or 0.1")
        return int(value)
    return value


def resolve_budget(budget: int | float, n_eligible: int) -> int:
    """How many samples to draw.

    budget: an int >= 1 is a count; a float in (0, 1] is a fraction of the
        eligible samples (rounded, at least 1).
    n_eligible: number of samples with positive probability.
    """
    if isinstance(n_eligible, bool) or not isinstance(n_eligible, Integral) or n_eligible < 1:
        raise InvalidInputError(f"there are no eligible samples to select from (n_eligible={n_eligible!r})")
    n = int(n_eligible)
    if isinstance(budget, bool):
        raise InvalidInputError(f"budget must be a count >= 1 or a fraction in (0, 1], got {budget!r}")
    if isinstance(budget, Integral):
        count = int(budget)
        if count < 1:
            raise InvalidInputError(f"budget must be a count >= 1 or a fraction in (0, 1], got {budget!r}")
    elif isinstance(budget, Real):
        f = float(budget)
        if not (math.isfinite(f) and 0.0 < f <= 1.0):
            raise InvalidInputError(
                f"budget {budget!r} is neither a whole count nor a fraction in (0, 1]: "
                "pass an int for a count (e.g. 5000) or a float like 0.1 for 10%"
            )
        count = max(1, round(f * n))
    else:
        raise InvalidInputError(f"budget must be a count >= 1 or a fraction in (0, 1], got {budget!r}")
    if count > n:
        raise InvalidInputError(f"budget {count} exceeds the {n} eligible samples: lower the budget or loosen the filters")
    return count


def check_budget(budget, n_positive: int) -> None:
    """A draw's budget: an int count between 1 and the samples with p > 0."""
    if isinstance(budget, bool) or not isinstance(budget, Integral):
        raise InvalidInputError(f"budget must be an int count here, got {budget!r} (use resolve_budget for fractions)")
    if budget < 1:
        raise InvalidInputError(f"budget must be >= 1, got {budget}")
    if budget > n_positive:
        raise InvalidInputError(
            f"budget {budget} exceeds the {n_positive} eligible samples (p > 0): "
            "lower the budget or loosen the filters"
        )


# --------------------------------------------------------------------------- validation


def as_assignments(assignments) -> np.ndarray:
    """(N,) int64 cluster ids, checked: 1-D, integer, non-negative."""
    a = np.asarray(assignments)
    if a.ndim != 1:
        raise InvalidInputError(f"assignments must be a (N,) array of cluster ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise InvalidInputError(f"assignments must be integer cluster ids, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and a.min() < 0:
        raise InvalidInputError(f"assignments contain negative cluster id {int(a.min())}: ids must be in [0, K)")
    return a


def as_probabilities(probabilities) -> np.ndarray:
    """(N,) float64 probabilities, checked (finite, >= 0, sum 1 within tolerance) and renormalised."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise InvalidInputError(f"probabilities must be a non-empty (N,) array, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise InvalidInputError("probabilities contain NaN or infinite values: recompute them with compute_sample_probabilities")
    if p.min() < 0:
        raise InvalidInputError(f"probabilities contain negative values (min {p.min():.3g}): they must be >= 0")
    total = float(p.sum())
    if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise InvalidInputError(
            f"probabilities sum to {total:.9g}, not 1: normalise them (compute_sample_probabilities does)"
        )
    return p if total == 1.0 else p / total
