"""Turn a client's expert scores into sampling probabilities, and draw the selection.

NDS (Yan, Acuna, Fidler, CVPR 2020) maps the K scores a client uploads to a
distribution over the N source samples, then draws the client's budget from it:

    a = softmax(z / T)                                  expert weights, (K,)
    p(x) = sum_k a_k w_k(x) = a_c(x) / |S_c(x)|         hard clusters: w_k = 1/|S_k| on S_k

The draw takes `budget` distinct samples without replacement, each draw proportional
to p among the samples not drawn yet (successive sampling). `SAMPLERS` holds two
exact implementations of that one distribution; they differ only in cost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np

from nds.errors import NDSError

log = logging.getLogger(__name__)

# float64 pairwise summation of 1e8 probabilities drifts by ~1e-10 relative; a sum
# further than this from 1 is a caller bug (unnormalised weights), not rounding.
PROBABILITY_SUM_TOLERANCE = 1e-6

# two-stage treats the members of a cluster as exchangeable, which is only exact if
# they share one probability. compute_sample_probabilities gives them bitwise-equal
# values; the slack admits a float32 round trip (6e-8 relative) and nothing coarser.
CLUSTER_CONSTANT_RTOL = 1e-6

# two-stage opens a time window expected to hold need + 4 sd + 16 arrivals. A short
# window is never wrong (the next window continues the same realisation), it only
# costs one more round; 4 sd makes that rare (~3e-5) at ~4/sqrt(B) extra draws.
WINDOW_OVERSHOOT_SD = 4.0
WINDOW_MIN_SLACK = 16

# Past this width rate * width loses meaning for the slowest clocks (p ~ 1e-300); the
# last window then simply takes every remaining member (always exact, just larger).
WINDOW_MAX_WIDTH = 1e250

# Window search: bisection on log-time; 60 halvings pin it far below one arrival.
WINDOW_BISECTION_STEPS = 60

# numpy's stable argsort is a radix sort for integer types of 16 bits or less, so
# cluster codes are narrowed to int16 whenever K allows.
RADIX_SORT_MAX_CLUSTERS = int(np.iinfo(np.int16).max)


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
        raise NDSError(f"scores must be a list of K numbers, got {scores!r:.80}") from exc
    if z.ndim != 1 or z.size == 0:
        raise NDSError(
            f"scores must be a non-empty 1-D list of K numbers (one per expert), got shape {z.shape}"
        )
    if not np.isfinite(z).all():
        bad = np.flatnonzero(~np.isfinite(z))[:5].tolist()
        raise NDSError(
            f"scores contain NaN or infinite values at positions {bad}: "
            "re-run the client scoring; every expert needs a finite score"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise NDSError(f"temperature must be a positive number, got {temperature!r}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise NDSError(f"temperature must be a finite number > 0, got {temperature!r} (e.g. 0.1)")
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
    a = _as_assignments(assignments)
    w = np.asarray(expert_weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise NDSError(f"expert_weights must be a non-empty (K,) array, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise NDSError("expert_weights must be finite, non-negative and not all zero (use compute_expert_weights)")
    k = w.size
    if a.size and a.max() >= k:
        raise NDSError(
            f"assignments refer to cluster {int(a.max())} but there are only {k} expert weights: "
            "the scores and the index have different K (use the scores made for this index version)"
        )
    counted = np.bincount(a, minlength=k)
    if cluster_sizes is None:
        sizes = counted
    else:
        sizes = np.asarray(cluster_sizes)
        if sizes.shape != (k,) or not np.issubdtype(sizes.dtype, np.integer) or (sizes < 0).any():
            raise NDSError(f"cluster_sizes must be ({k},) non-negative integers, got shape {sizes.shape}")
        empty_but_used = (sizes == 0) & (counted > 0)
        if empty_but_used.any():
            raise NDSError(
                f"cluster_sizes says cluster {int(np.flatnonzero(empty_but_used)[0])} is empty "
                "but samples are assigned to it: sizes and assignments come from different index versions"
            )
    if eligible is None:
        n_eligible = counted
    else:
        mask = np.asarray(eligible)
        if mask.dtype != np.bool_ or mask.shape != a.shape:
            raise NDSError(f"eligible must be a ({a.size},) bool mask, got {mask.dtype} {mask.shape}")
        n_eligible = np.bincount(a[mask], minlength=k)
    # Normalise per cluster (K values) rather than per sample, so members stay identical.
    p = compute_member_probabilities(w, sizes, n_eligible)[a]
    if eligible is not None:
        p[~mask] = 0.0
    return p


# --------------------------------------------------------------------------- budget


def resolve_budget(budget: int | float, n_eligible: int) -> int:
    """How many samples to draw.

    budget: an int >= 1 is a count; a float in (0, 1] is a fraction of the
        eligible samples (rounded, at least 1).
    n_eligible: number of samples with positive probability.
    """
    if isinstance(n_eligible, bool) or not isinstance(n_eligible, Integral) or n_eligible < 1:
        raise NDSError(f"there are no eligible samples to select from (n_eligible={n_eligible!r})")
    n = int(n_eligible)
    if isinstance(budget, bool):
        raise NDSError(f"budget must be a count >= 1 or a fraction in (0, 1], got {budget!r}")
    if isinstance(budget, Integral):
        count = int(budget)
        if count < 1:
            raise NDSError(f"budget must be a count >= 1 or a fraction in (0, 1], got {budget!r}")
    elif isinstance(budget, Real):
        f = float(budget)
        if not (math.isfinite(f) and 0.0 < f <= 1.0):
            raise NDSError(
                f"budget {budget!r} is neither a whole count nor a fraction in (0, 1]: "
                "pass an int for a count (e.g. 5000) or a float like 0.1 for 10%"
            )
        count = max(1, round(f * n))
    else:
        raise NDSError(f"budget must be a count >= 1 or a fraction in (0, 1], got {budget!r}")
    if count > n:
        raise NDSError(f"budget {count} exceeds the {n} eligible samples: lower the budget or loosen the filters")
    return count


# --------------------------------------------------------------------------- samplers


def _draw_es_keys(p: np.ndarray, budget: int, *, rng: np.random.Generator, assignments=None) -> np.ndarray:
    """Efraimidis-Spirakis (2006) weighted sampling without replacement.

    Each sample gets key_i = log(u_i) / p_i; the `budget` largest keys, in key order,
    are distributed exactly as successive sampling proportional to p. We use the
    equivalent arrival time t_i = E_i / p_i = -key_i with E_i ~ Exp(1): the first
    arrival of competing exponential clocks with rates p is i with probability
    p_i / sum(p), and by memorylessness the same holds among the clocks left.
    Smallest times come first. Cost: N exponentials, one argpartition, a sort of B.
    Samples with p = 0 never get a clock, so they are never chosen.
    """
    positive = p > 0
    candidates = None if positive.all() else np.flatnonzero(positive)
    rates = p if candidates is None else p[candidates]
    exponentials = rng.standard_exponential(rates.size)
    with np.errstate(over="ignore"):
        times = exponentials / rates
    if np.isinf(times).any():
        # p below ~1e-306 overflows E / p; log time is the same order and never overflows.
        times = np.log(exponentials) - np.log(rates)
    if budget < times.size:
        top = np.argpartition(times, budget - 1)[:budget]
    else:
        top = np.arange(times.size)
    top = top[np.argsort(times[top], kind="stable")]
    return top if candidates is None else candidates[top]


def _draw_two_stage(p: np.ndarray, budget: int, *, rng: np.random.Generator, assignments=None) -> np.ndarray:
    """The es-keys distribution with O(K + B) random numbers, using the hard clusters.

    Stage 1 (which clusters, in which order). Under es-keys a cluster c with n_c
    eligible members of equal probability q_c holds n_c i.i.d. Exp(q_c) arrival
    times. Only the B earliest matter. Inside a window [0, t] the number of cluster-c
    arrivals is Binomial(n_c, 1 - exp(-q_c t)) and, given that number, they are
    i.i.d. Exp(q_c) truncated to [0, t]. If the window holds fewer than B arrivals in
    total, the next window continues the same realisation: by memorylessness the
    remaining members' times past t are again i.i.d. Exp(q_c). Once >= B arrivals
    are in hand the B earliest, sorted, give the per-rank cluster sequence with
    exactly the es-keys law (the window size affects cost, never the result's law).
    Stage 2 (which members). Members of a cluster are exchangeable, so the m_c
    arrivals of cluster c go to a uniformly random ordered m_c-subset of its members.

    Needs `assignments` and p constant within each cluster (as produced by
    compute_sample_probabilities). Finding "the r-th member of cluster c" needs the
    members grouped by cluster; that is done block by block (see _group_by_cluster),
    O(N) work in cache-sized pieces and 2 bytes per sample.
    """
    if assignments is None:
        raise NDSError("method 'two-stage' needs assignments (the (N,) cluster id of each sample)")
    a = _as_assignments(assignments)
    if a.shape != p.shape:
        raise NDSError(f"assignments has shape {a.shape} but probabilities has {p.shape}: pass the same N samples")
    positive = p > 0
    if positive.all():
        members, a_pos, p_pos = None, a, p
    else:
        members = np.flatnonzero(positive)
        a_pos, p_pos = a[members], p[members]
    groups = _group_by_cluster(a_pos, p_pos)
    spread = groups.p_max - groups.p_min
    if (spread > CLUSTER_CONSTANT_RTOL * groups.p_max).any():
        c = int(np.argmax(spread > CLUSTER_CONSTANT_RTOL * groups.p_max))
        raise NDSError(
            f"method 'two-stage' needs one probability per cluster, but cluster {c} has members "
            f"from {groups.p_min[c]:.3g} to {groups.p_max[c]:.3g}: use method='es-keys' for these probabilities"
        )
    n_c = groups.counts.sum(axis=0)
    rates, windows, m_c = _arrival_windows(n_c, groups.p_max, budget, rng=rng)
    slot = _rank_arrivals(rates, windows, budget, rng=rng)

    # Stage 2: each cluster's arrival slots, in slot order, get a random ordered subset.
    start = np.cumsum(m_c) - m_c
    member = np.empty(int(m_c.sum()), dtype=np.int64)
    for c in np.flatnonzero(m_c):  # at most K iterations
        m = int(m_c[c])
        member_rank = rng.choice(int(n_c[c]), size=m, replace=False, shuffle=True)
        member[start[c] : start[c] + m] = groups.locate(int(c), member_rank)
    chosen = member[slot]
    return chosen if members is None else members[chosen]


# Grouping members by cluster one block at a time keeps numpy's radix sort inside the
# CPU cache: 2**14 ids per block sorted 7x faster than one global sort at N = 1e7.
GROUP_BLOCK = 2**14
# Cap on the (blocks x K) count table (int64: 128 MiB); blocks grow past GROUP_BLOCK
# when N * K is large enough to exceed it.
GROUP_TABLE_MAX_CELLS = 2**24


class _ClusterGroups:
    """Eligible samples grouped by cluster within fixed-size blocks.

    counts: (n_blocks, K) int64 members of each cluster in each block.
    local_order: (M,) uint16/uint32; within each block, positions sorted by cluster.
    p_min, p_max: (K,) float64 smallest and largest probability in each cluster.
    """

    def __init__(self, block: int, counts: np.ndarray, local_order: np.ndarray, p_min, p_max):
        self.block, self.counts, self.local_order = block, counts, local_order
        self.p_min, self.p_max = p_min, p_max
        # Cluster-major copies so that locate() reads one contiguous row per cluster.
        self._counts_by_cluster = np.ascontiguousarray(counts.T)  # (K, n_blocks)
        self._cum_by_cluster = np.cumsum(self._counts_by_cluster, axis=1)
        self._cell_start = np.ascontiguousarray((np.cumsum(counts, axis=1) - counts).T)  # (K, n_blocks)

    def locate(self, cluster: int, member_rank: np.ndarray) -> np.ndarray:
        """(m,) positions of the member_rank-th members (in index order) of one cluster."""
        cum = self._cum_by_cluster[cluster]
        block = np.searchsorted(cum, member_rank, side="right")
        within_cell = member_rank - (cum[block] - self._counts_by_cluster[cluster, block])
        slot = block * self.block + self._cell_start[cluster, block] + within_cell
        return block * self.block + self.local_order[slot].astype(np.int64)


def _group_by_cluster(a: np.ndarray, p: np.ndarray) -> _ClusterGroups:
    """a: (M,) int64 cluster ids; p: (M,) float64. One pass over blocks (N / block iterations)."""
    k = int(a.max()) + 1
    m = a.size
    block = GROUP_BLOCK
    while -(-m // block) * k > GROUP_TABLE_MAX_CELLS and block < m:
        block *= 2
    n_blocks = -(-m // block)
    counts = np.empty((n_blocks, k), dtype=np.int64)
    local_order = np.empty(m, dtype=np.uint16 if block <= 2**16 else np.uint32)
    p_min = np.full(k, np.inf)
    p_max = np.zeros(k)
    for b in range(n_blocks):
        lo, hi = b * block, min((b + 1) * block, m)
        codes = _narrow_codes(a[lo:hi], k)
        order = np.argsort(codes, kind="stable")
        local_order[lo:hi] = order
        cnt = np.bincount(codes, minlength=k)
        counts[b] = cnt
        present = np.flatnonzero(cnt)
        starts = (np.cumsum(cnt) - cnt)[present]
        grouped = p[lo:hi][order]
        p_min[present] = np.minimum(p_min[present], np.minimum.reduceat(grouped, starts))
        p_max[present] = np.maximum(p_max[present], np.maximum.reduceat(grouped, starts))
    p_min[np.isinf(p_min)] = 0.0
    return _ClusterGroups(block, counts, local_order, p_min, p_max)


def _narrow_codes(a: np.ndarray, k: int) -> np.ndarray:
    """Cluster ids as int16 when K allows, so numpy's stable argsort is a radix sort."""
    return a.astype(np.int16) if k <= RADIX_SORT_MAX_CLUSTERS else a


class _Window(NamedTuple):
    """One time window of stage 1: [start, start + width) (width inf: every remaining clock)."""

    start: float
    width: float
    inside: np.ndarray  # (K,) chance that a remaining clock of each cluster rings inside
    count: np.ndarray  # (K,) int64 arrivals of each cluster inside


def _arrival_windows(n_c: np.ndarray, q: np.ndarray, budget: int, *, rng: np.random.Generator):
    """Stage 1a of the two-stage draw (see _draw_two_stage): how many arrivals per cluster.

    n_c: (K,) int eligible members per cluster; q: (K,) float per-member probability
    (> 0 wherever n_c > 0). Opens windows until they hold >= budget arrivals; O(K) each.
    Returns (rates (K,), windows, m): m (K,) int64 arrivals per cluster over all windows,
    at least the ranks each cluster gets. Arrivals are numbered cluster-major ("slots":
    cluster c owns [start_c, start_c + m_c), start = cumsum(m) - m), windows in order
    within a cluster. Only their times are left to draw (_rank_arrivals), so stage 2
    may run meanwhile.
    """
    remaining = n_c.astype(np.int64)
    rates = np.where(n_c > 0, q, 0.0)
    windows: list[_Window] = []
    start, have = 0.0, 0
    while have < budget:
        need = budget - have
        target = need + WINDOW_OVERSHOOT_SD * math.sqrt(need) + WINDOW_MIN_SLACK
        width = math.inf if target >= remaining.sum() else _window_width(remaining, rates, target)
        inside = np.where(remaining > 0, 1.0, 0.0) if math.isinf(width) else -np.expm1(-rates * width)
        count = rng.binomial(remaining, inside)
        windows.append(_Window(start, width, inside, count))
        start += width
        remaining -= count
        have += int(count.sum())
    return rates, windows, np.sum([w.count for w in windows], axis=0)


def _rank_arrivals(rates: np.ndarray, windows: list, budget: int, *, rng: np.random.Generator) -> np.ndarray:
    """Stage 1b: (B,) int64 slots of the `budget` earliest arrivals, in time (rank) order.

    Which slot of a cluster is which arrival does not depend on the arrival times, so
    stage 2 hands cluster c's slots, in slot order, a uniformly random ordered
    m_c-subset of its members: its ranks then get a uniformly random ordered subset, as
    the law asks (slots that miss the first B take a random part of it, which leaves
    the rest uniform too). No per-rank sort by cluster is needed.
    """
    times, last = [], None
    for w in windows:
        n_w = int(w.count.sum())
        if math.isinf(w.width):
            # Every remaining member arrives after all finite windows; log time keeps the
            # order of the slowest clocks (E / q would overflow for q ~ 1e-306).
            u = rng.random(n_w)
            last = np.log(-np.log1p(-u)) - np.log(np.repeat(rates, w.count))
            continue
        # Inverse CDF of Exp(q) truncated to [0, width]: F(x) = (1 - e^{-qx}) / (1 - e^{-q width}),
        # t = log1p(-u inside) / -q >= +0.0. Arrivals are cluster-major: np.repeat spreads the
        # per-cluster constants; the rest is in place.
        t = rng.random(n_w)
        t *= np.repeat(-w.inside, w.count)
        np.log1p(t, out=t)
        t /= np.repeat(-rates, w.count)
        np.minimum(t, w.width, out=t)
        if w.start:
            t += w.start
        times.append(t)
    ranked = (_argsort_times(times[0] if len(times) == 1 else np.concatenate(times)) if times
              else np.empty(0, dtype=np.int64))
    del times
    if last is not None:
        ranked = np.concatenate([ranked, ranked.size + np.argsort(last, kind="stable")])
    first = ranked[:budget]
    if len(windows) == 1:  # one window: arrival i is slot i
        return first
    # Renumber window-major arrivals cluster-major (windows in order within a cluster).
    k = rates.size
    window_major = np.concatenate([np.repeat(_narrow_codes(np.arange(k), k), w.count) for w in windows])
    slot = np.empty(window_major.size, dtype=np.int64)
    slot[np.argsort(window_major, kind="stable")] = np.arange(window_major.size)
    return slot[first]


def _argsort_times(t: np.ndarray) -> np.ndarray:
    """(M,) int64 indices that sort t (float64, >= +0.0) ascending, ties by index.

    numpy sorts plain integers with SIMD and 5x faster than it argsorts floats. The bits of a
    non-negative double, read as uint64, rise with its value, so the key is those bits with
    the index in place of the lowest mantissa bits (about 32 bits of mantissa stay at 1e6
    times: a relative quantum of 2**-32). Times that share a key (a few hundred among 1e6)
    are then put in order by their exact values: the result is exactly
    np.argsort(t, kind="stable").
    """
    m = t.size
    bits = max(1, (m - 1).bit_length())
    if m < 2 or bits > 36:
        return np.argsort(t, kind="stable")
    keys, index = _sort_packed(
        np.bitwise_and(np.ascontiguousarray(t, dtype=np.float64).view(np.uint64), ~np.uint64((1 << bits) - 1)), bits)
    if keys[-1] >> np.uint64(63 - bits):  # the sign bit: a negative time or -0.0 (not produced here)
        return np.argsort(t, kind="stable")
    shared = keys[1:] == keys[:-1]
    if shared.any():
        at = np.flatnonzero(np.concatenate([shared, [False]]) | np.concatenate([[False], shared]))
        tied = index[at]
        index[at] = tied[np.lexsort((tied, t[tied], keys[at]))]
    return index


#: np.arange(uint64) kept between draws up to this length (32 MiB): no page-in per draw.
ARANGE_CACHE_MAX = 2**22
_ARANGE_U64 = np.arange(0, dtype=np.uint64)


def _arange_u64(m: int) -> np.ndarray:
    """np.arange(m, dtype=uint64), read-only: a slice of a cache for m <= ARANGE_CACHE_MAX."""
    global _ARANGE_U64
    cached = _ARANGE_U64
    if m > ARANGE_CACHE_MAX:
        return np.arange(m, dtype=np.uint64)
    if cached.size < m:
        cached = np.arange(min(max(m, 2 * cached.size), ARANGE_CACHE_MAX), dtype=np.uint64)
        cached.flags.writeable = False
        _ARANGE_U64 = cached
    return cached[:m]


def _first_occurrences(values: np.ndarray, bound: int) -> np.ndarray:
    """(M,) bool: True at the first occurrence of each value (ints in [0, bound)).

    Repeats are rare here (uniform draws from clusters much larger than the draws), so the
    values alone are sorted -- as uint32 when bound allows, twice as fast as uint64 -- to find
    the repeated ones; only the draws carrying a repeated value (found through a bool table
    over [0, max repeated value]) are ordered exactly (_first_occurrences_exact).
    """
    if bound > 2**32:
        return _first_occurrences_exact(values, bound)
    first = np.ones(values.size, dtype=bool)
    if values.size < 2:
        return first
    ordered = values.astype(np.uint32)
    ordered.sort()
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    del ordered
    if repeated.size:
        table = np.zeros(int(repeated.max()) + 2, dtype=bool)  # last cell False: clip lands there
        table[repeated] = True
        at = np.flatnonzero(np.take(table, values, mode="clip"))
        first[at] = False
        first[at[_first_occurrences_exact(values[at], bound)]] = True
    return first


def _first_occurrences_exact(values: np.ndarray, bound: int) -> np.ndarray:
    """_first_occurrences by one packed-key sort (value high, index low), like _argsort_times'."""
    m = values.size
    bits = max(1, (m - 1).bit_length())
    first = np.zeros(m, dtype=bool)
    if m == 0:
        return first
    if int(bound).bit_length() + bits > 64:
        first[np.unique(values, return_index=True)[1]] = True
        return first
    keys = values.astype(np.uint64)
    keys <<= np.uint64(bits)
    value, index = _sort_packed(keys, bits)
    lead = np.empty(m, dtype=bool)
    lead[0] = True
    np.not_equal(value[1:], value[:-1], out=lead[1:])
    first[index[lead]] = True
    return first


def _sort_packed(keys: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort uint64 `keys` whose low `bits` bits are 0, ties by index: one SIMD integer sort.

    The index rides in the low bits; in place. Returns (keys >> bits, sorted; (M,) int64 index of each).
    """
    keys |= _arange_u64(keys.size)
    keys.sort()
    index = np.bitwise_and(keys, np.uint64((1 << bits) - 1)).view(np.int64)  # < 2**bits: same number
    keys >>= np.uint64(bits)
    return keys, index


def _window_width(remaining: np.ndarray, rates: np.ndarray, target: float) -> float:
    """Smallest-ish t with expected arrivals sum_c n_c (1 - exp(-q_c t)) >= target."""

    def expected(t: float) -> float:
        return float(remaining @ -np.expm1(-rates * t))

    lo = hi = target / max(float(remaining @ rates), np.finfo(float).tiny)  # rate-1 lower bound
    while expected(hi) < target:
        if hi > WINDOW_MAX_WIDTH:  # only clocks too slow to time in float64 are left
            return math.inf
        lo, hi = hi, hi * 2.0
    for _ in range(WINDOW_BISECTION_STEPS):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
        if expected(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi


Sampler = Callable[..., np.ndarray]

SAMPLERS: dict[str, Sampler] = {
    "es-keys": _draw_es_keys,
    "two-stage": _draw_two_stage,
}
DEFAULT_SAMPLER = "es-keys"


def _check_budget(budget, n_positive: int) -> None:
    """A draw's budget: an int count between 1 and the samples with p > 0."""
    if isinstance(budget, bool) or not isinstance(budget, Integral):
        raise NDSError(f"budget must be an int count here, got {budget!r} (use resolve_budget for fractions)")
    if budget < 1:
        raise NDSError(f"budget must be >= 1, got {budget}")
    if budget > n_positive:
        raise NDSError(
            f"budget {budget} exceeds the {n_positive} eligible samples (p > 0): "
            "lower the budget or loosen the filters"
        )


def select_samples(
    probabilities,
    budget: int,
    *,
    seed: int,
    method: str = DEFAULT_SAMPLER,
    assignments=None,
) -> np.ndarray:
    """Draw `budget` distinct samples without replacement, proportional to p.

    probabilities: (N,) float64, non-negative, summing to 1 (tiny float error is
        renormalised away). Samples with p = 0 are never selected.
    budget: number of samples, 1 <= budget <= count(p > 0) (see resolve_budget).
    seed: the only source of randomness; same inputs and seed -> same selection.
    method: a key of SAMPLERS; every sampler draws from the same distribution.
    assignments: (N,) int cluster ids, required by 'two-stage'.
    Returns (B,) int64 sample indices in rank order (rank 0 = drawn first).
    """
    p = _as_probabilities(probabilities)
    if method not in SAMPLERS:
        raise NDSError(f"unknown selection method {method!r}: choose one of {sorted(SAMPLERS)}")
    n_positive = int(np.count_nonzero(p))
    _check_budget(budget, n_positive)
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise NDSError(f"seed must be a non-negative int, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    chosen = SAMPLERS[method](p, int(budget), rng=rng, assignments=assignments)
    log.info("selected %d of %d eligible samples with %s (seed %d)", budget, n_positive, method, seed)
    return chosen.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- cluster layout


# Counting sort block: 2**20 int16 codes sort in cache-sized pieces (see GROUP_BLOCK) while
# keeping the Python loop to N / 1e6 iterations.
LAYOUT_BLOCK = 2**20

# A cluster whose draw takes more than this share of its members is drawn by a partial
# shuffle of its members: O(n_c) = O(m_c / DENSE_SHARE), a few ns per member. Below it,
# positions are drawn with replacement and repeats discarded (<= 1 / (1 - share) = 1.11 tries
# per accepted member, but ~30 ns per try with the dedupe sort). Measured at B = 1e6 of
# N = 1e7: stage 2 took 13-22 ms at 0.1 against 26-33 ms at 0.5 (K = 100 / 1000).
DENSE_SHARE = 0.1
# A cluster with less than this share of its members eligible is drawn from its eligible
# members, listed (O(n_c log M) for M exclusions); above it, excluded draws are rejected.
EXCLUDED_DENSE_SHARE = 0.5

# Each rejection round draws the expected number of tries for the missing members, plus this
# many standard deviations and a floor, so one or two rounds suffice (a short round is never
# wrong: the next one continues the same sequential process).
ROUND_OVERSHOOT_SD = 4.0
ROUND_MIN_SLACK = 8

# From this budget on, stage 1's arrival times and stage 2's members are drawn on two
# threads at once (1.1-1.4x measured at B = 1e5-1e6 on 2 cores); below it a thread costs more
# than it saves.
THREAD_MIN_BUDGET = 2**16

LAYOUT_FILES = ("order.npy", "offsets.npy")


def build_cluster_layout(assignments, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices grouped by cluster, computed once per index for select_samples_clustered.

    assignments: (N,) int cluster ids in [0, k) (a memory-mapped array is read block by block).
    Returns (order, offsets): order (N,) int32 (int64 if N >= 2**31) holds the members of
    cluster c, in index order, at order[offsets[c]:offsets[c + 1]]; offsets (k + 1,) int64.
    O(N) time (a blockwise counting sort), memory: the output plus one block.
    """
    a = np.asarray(assignments)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise NDSError(f"assignments must be a (N,) array of integer cluster ids, got {a.dtype} {a.shape}")
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise NDSError(f"k must be a positive int (the number of clusters), got {k!r}")
    k = int(k)
    n = a.size
    counts = np.zeros(k, dtype=np.int64)
    for lo in range(0, n, LAYOUT_BLOCK):
        block = a[lo : lo + LAYOUT_BLOCK]
        if block.min() < 0 or block.max() >= k:
            raise NDSError(
                f"assignments hold cluster ids in [{int(block.min())}, {int(block.max())}] "
                f"but k={k}: ids must lie in [0, k)"
            )
        counts += np.bincount(block, minlength=k)
    offsets = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    order = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
    cursor = offsets[:-1].copy()
    for lo in range(0, n, LAYOUT_BLOCK):
        codes = _narrow_codes(np.asarray(a[lo : lo + LAYOUT_BLOCK]), k)
        local = np.argsort(codes, kind="stable")
        cnt = np.bincount(codes, minlength=k)
        sorted_codes = codes[local].astype(np.int64)
        within = np.arange(local.size) - (np.cumsum(cnt) - cnt)[sorted_codes]
        order[cursor[sorted_codes] + within] = local + lo
        cursor += cnt
    return order, offsets


def save_cluster_layout(layout, directory) -> list:
    """Write (order, offsets) as .npy files in `directory` (atomically each); returns the paths."""
    from pathlib import Path

    order, offsets = _as_layout(layout)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, arr in zip(LAYOUT_FILES, (order, offsets)):
        path = directory / name
        tmp = directory / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, arr)
        tmp.replace(path)
        paths.append(path)
    return paths


def load_cluster_layout(directory, *, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read the layout written by save_cluster_layout; `order` memory-mapped unless mmap=False."""
    from pathlib import Path

    directory = Path(directory)
    missing = [n for n in LAYOUT_FILES if not (directory / n).exists()]
    if missing:
        raise NDSError(f"cluster layout {missing} missing in {directory}: rebuild it with build_cluster_layout")
    order = np.load(directory / LAYOUT_FILES[0], mmap_mode="r" if mmap else None)
    offsets = np.load(directory / LAYOUT_FILES[1])
    return _as_layout((order, offsets))


def compute_member_probabilities(expert_weights, cluster_sizes, eligible_counts=None) -> np.ndarray:
    """(K,) float64 probability of one eligible member of each cluster: p(x) = out[a(x)].

    The same numbers compute_sample_probabilities gives every eligible member, in O(K):
    cluster_sizes (K,) int |S_k| as stored with the index; eligible_counts (K,) int
    eligible members per cluster (None: all). Clusters with no eligible member get 0.
    """
    w = np.asarray(expert_weights, dtype=np.float64)
    sizes = np.asarray(cluster_sizes)
    if w.ndim != 1 or w.size == 0:
        raise NDSError(f"expert_weights must be a non-empty (K,) array, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise NDSError("expert_weights must be finite, non-negative and not all zero (use compute_expert_weights)")
    k = w.size
    if sizes.shape != (k,) or not np.issubdtype(sizes.dtype, np.integer) or (sizes < 0).any():
        raise NDSError(
            f"cluster_sizes must be ({k},) non-negative integers (one per expert weight), got {sizes.dtype} {sizes.shape}: "
            "the scores and the index have different K"
        )
    n_eligible = sizes if eligible_counts is None else np.asarray(eligible_counts)
    if n_eligible.shape != (k,) or (n_eligible < 0).any() or (n_eligible > sizes).any():
        raise NDSError(f"eligible_counts must be ({k},) integers between 0 and the cluster sizes")
    per_member = np.divide(w, sizes, out=np.zeros(k), where=sizes > 0)
    total = float(per_member @ n_eligible)
    if not total > 0:
        raise NDSError(
            "no eligible sample has positive probability: every eligible sample sits in a cluster "
            "whose expert weight is 0 (raise the temperature or loosen the dataset filter)"
        )
    return np.where(n_eligible > 0, per_member / total, 0.0)


def select_samples_clustered(
    layout,
    expert_weights,
    budget: int,
    *,
    seed: int,
    excluded=None,
    assignments=None,
) -> np.ndarray:
    """The two-stage draw in O(K + B) work: independent of N apart from the exclusions.

    Same law as select_samples(compute_sample_probabilities(assignments, expert_weights,
    eligible=...), budget, seed=...) with either sampler: successive sampling, each draw
    proportional to p(x) = a_c(x) / |S_c(x)| among the eligible samples not drawn yet.
    (Same law, not the same numbers: the random streams differ.)

    layout: (order, offsets) from build_cluster_layout / load_cluster_layout; `order` may be
        memory-mapped, only the B drawn positions (plus rejected ones) are read.
    expert_weights: (K,) float, non-negative (compute_expert_weights).
    budget: int count, 1 <= budget <= eligible samples in clusters of positive weight.
    seed: the only source of randomness; same inputs and seed -> same selection.
    excluded: (M,) int sample indices that may not be drawn (dataset filter, exclusions), or
        None. Costs O(M log M); pass np.flatnonzero(~eligible).
    assignments: (N,) int cluster ids, needed only with `excluded` (reads M entries).
    Returns (B,) int64 sample indices in rank order (rank 0 = drawn first).

    Stage 1 (how many arrivals per cluster, then their rank order) is _arrival_windows and
    _rank_arrivals, exactly as in two-stage; it runs beside stage 2 on a second thread. Stage 2 gives
    cluster c's m_c arrival slots a uniformly random ordered m_c-subset of its eligible members:
    positions j in [0, n_c) are drawn uniformly, discarding repeats and excluded members
    (the sequential form of drawing without replacement, vectorised over clusters in
    rounds), or, for dense clusters (DENSE_SHARE, EXCLUDED_DENSE_SHARE), by a partial shuffle of the eligible members.
    """
    order, offsets = _as_layout(layout)
    k = offsets.size - 1
    sizes = np.diff(offsets)
    w = np.asarray(expert_weights, dtype=np.float64)
    if w.shape != (k,):
        raise NDSError(
            f"expert_weights has shape {w.shape} but the layout has {k} clusters: "
            "the scores and the index have different K (use the scores made for this index version)"
        )
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise NDSError(f"seed must be a non-negative int, got {seed!r}")
    excluded_sorted, excluded_counts = _excluded_by_cluster(excluded, assignments, order.size, k)
    eligible_counts = sizes - excluded_counts
    q = compute_member_probabilities(w, sizes, eligible_counts)
    n_c = np.where(q > 0, eligible_counts, 0)
    n_positive = int(n_c.sum())
    _check_budget(budget, n_positive)
    rng = np.random.default_rng(int(seed))
    budget = int(budget)
    rates, windows, m_c = _arrival_windows(n_c, q, budget, rng=rng)
    # Arrival times (stage 1b) and members (stage 2) use their own streams, so they can be
    # drawn at once on two threads (numpy releases the GIL) with the same result either way.
    time_rng, member_rng = rng.spawn(2)
    slot, members = _run_pair(
        partial(_rank_arrivals, rates, windows, budget, rng=time_rng),
        # Read `order` in slot order (cluster by cluster: cache-local) on the same thread.
        lambda: np.asarray(order[_draw_members(order, offsets, m_c, eligible_counts, excluded_sorted,
                                               excluded_counts, member_rng)]),
        parallel=budget >= THREAD_MIN_BUDGET,
    )
    chosen = members[slot].astype(np.int64, copy=False)  # rank order
    log.info("selected %d of %d eligible samples with clustered two-stage (seed %d)", budget, n_positive, seed)
    return chosen


def _run_pair(first: Callable, second: Callable, *, parallel: bool):
    """(first(), second()); first on a worker thread when parallel (numpy releases the GIL)."""
    if not parallel:
        return first(), second()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(first)
        other = second()
        return pending.result(), other


def _draw_members(order, offsets, m_c, eligible_counts, excluded_sorted, excluded_counts, rng) -> np.ndarray:
    """Stage 2: (M,) int64 positions into `order` for the M = sum(m_c) arrival slots.

    Cluster c's slots get a uniformly random ordered m_c-subset of its eligible members.
    """
    sizes = np.diff(offsets)
    # position[s]: where in `order` the member for arrival slot s sits (cluster-major slots).
    start = np.cumsum(m_c) - m_c
    position = np.empty(int(m_c.sum()), dtype=np.int64)
    dense = (m_c > DENSE_SHARE * sizes) | (eligible_counts < EXCLUDED_DENSE_SHARE * sizes)
    dense &= m_c > 0
    for c in np.flatnonzero(dense):  # each costs O(n_c) = O(m_c / DENSE_SHARE), or an excluded-heavy cluster
        m = int(m_c[c])
        if excluded_counts[c]:
            candidates = offsets[c] + np.flatnonzero(~_is_excluded(
                np.asarray(order[offsets[c] : offsets[c + 1]], dtype=np.int64), excluded_sorted))
            position[start[c] : start[c] + m] = candidates[rng.choice(candidates.size, size=m, replace=False, shuffle=True)]
        else:  # the candidates are offsets[c] + arange(n_c): no need to build them
            position[start[c] : start[c] + m] = rng.choice(int(sizes[c]), size=m, replace=False, shuffle=True)
            position[start[c] : start[c] + m] += offsets[c]
    sparse = (m_c > 0) & ~dense
    if sparse.any():
        drawn = _draw_sparse_positions(sizes, eligible_counts, m_c * sparse, offsets, order, excluded_sorted, rng)
        if not dense.any():
            return drawn
        position[np.repeat(sparse, m_c)] = drawn
    return position


def _draw_sparse_positions(sizes, eligible_counts, want, offsets, order, excluded_sorted, rng) -> np.ndarray:
    """Positions into `order`, want[c] per cluster, cluster-major, each cluster's in draw order.

    Per cluster: positions uniform on [0, n_c), dropping repeats and excluded members, until
    want[c] are kept: exactly a uniformly random ordered want[c]-subset of the eligible
    members. Rounds are vectorised over clusters; kept positions come first in the next
    round, so "first occurrence" keeps the sequential order.
    """
    k = sizes.size
    kept = np.empty(0, dtype=np.int64)
    have = np.zeros(k, dtype=np.int64)
    while True:
        deficit = want - have
        if not deficit.any():
            break
        active = np.flatnonzero(deficit)
        d = deficit[active].astype(np.float64)
        n = sizes[active].astype(np.float64)
        avail = (eligible_counts[active] - have[active]).astype(np.float64)
        # Expected tries for d more distinct eligible members: n * (H(avail) - H(avail - d)).
        tries = n * (np.log(avail + 0.5) - np.log(avail - d + 0.5))
        tries = np.ceil(tries + ROUND_OVERSHOOT_SD * np.sqrt(tries) + ROUND_MIN_SLACK).astype(np.int64)
        # offset + floor(u * n) per try. u <= 1 - 2**-53, so u * n rounds below n for any
        # n < 2**53: no clamp needed; the floor comes before the offset, and their sum is
        # exact in float64 below 2**53.
        draws = rng.random(int(tries.sum()))
        draws *= np.repeat(sizes[active].astype(np.float64), tries)
        np.floor(draws, out=draws)
        draws += np.repeat(offsets[active].astype(np.float64), tries)
        draws = draws.astype(np.int64)
        cand = np.concatenate([kept, draws]) if kept.size else draws  # cluster-major within each part
        first = _first_occurrences(cand, offsets[-1])
        if excluded_sorted is not None:
            first[first] = ~_is_excluded(np.asarray(order[cand[first]], dtype=np.int64), excluded_sorted)
        cnt = have.copy()  # every kept member is a first occurrence and eligible
        cnt[active] += np.add.reduceat(first[kept.size :], np.cumsum(tries) - tries, dtype=np.int64)
        cand = cand[first]
        if kept.size:  # kept members came first: group by cluster again, keeping the draw order
            cluster = np.searchsorted(offsets, cand, side="right") - 1
            cand = cand[np.argsort(_narrow_codes(cluster, k), kind="stable")]
        have = np.minimum(cnt, want)
        excess = cnt - have
        if excess.any():  # drop each cluster's members past want[c] (the last ones drawn)
            tail_start = np.repeat(np.cumsum(cnt) - excess, excess)
            tail = tail_start + np.arange(tail_start.size) - np.repeat(np.cumsum(excess) - excess, excess)
            keep = np.ones(cand.size, dtype=bool)
            keep[tail] = False
            cand = cand[keep]
        kept = cand
    return kept


def _excluded_by_cluster(excluded, assignments, n: int, k: int):
    """(sorted unique excluded indices or None, (K,) excluded members per cluster)."""
    if excluded is None:
        return None, np.zeros(k, dtype=np.int64)
    x = np.asarray(excluded)
    if x.ndim != 1 or (x.size and not np.issubdtype(x.dtype, np.integer)):
        raise NDSError(f"excluded must be a (M,) array of sample indices, got {x.dtype} {x.shape} "
                       "(from a bool mask use np.flatnonzero(~eligible))")
    if x.size == 0:
        return None, np.zeros(k, dtype=np.int64)
    x = np.unique(x.astype(np.int64))
    if x[0] < 0 or x[-1] >= n:
        raise NDSError(f"excluded holds sample index {int(x[0] if x[0] < 0 else x[-1])} outside [0, {n})")
    if assignments is None:
        raise NDSError("excluded needs assignments (the (N,) cluster id of each sample) to count exclusions per cluster")
    a = np.asarray(assignments)
    if a.shape != (n,):
        raise NDSError(f"assignments has shape {a.shape} but the layout holds {n} samples: pass the same index")
    return x, np.bincount(np.asarray(a[x], dtype=np.int64), minlength=k)


def _is_excluded(samples: np.ndarray, excluded_sorted: np.ndarray) -> np.ndarray:
    at = np.searchsorted(excluded_sorted, samples)
    at[at == excluded_sorted.size] = 0
    return excluded_sorted[at] == samples


def _as_layout(layout) -> tuple[np.ndarray, np.ndarray]:
    try:
        order, offsets = layout
    except (TypeError, ValueError):
        raise NDSError("layout must be the (order, offsets) pair from build_cluster_layout") from None
    order = order if isinstance(order, np.ndarray) else np.asarray(order)
    offsets = np.asarray(offsets)
    if order.ndim != 1 or (order.size and not np.issubdtype(order.dtype, np.integer)):
        raise NDSError(f"layout order must be a (N,) integer array, got {order.dtype} {order.shape}")
    if offsets.ndim != 1 or offsets.size < 2 or not np.issubdtype(offsets.dtype, np.integer):
        raise NDSError(f"layout offsets must be a (K+1,) integer array, got {offsets.dtype} {offsets.shape}")
    offsets = offsets.astype(np.int64, copy=False)
    if offsets[0] != 0 or offsets[-1] != order.size or (np.diff(offsets) < 0).any():
        raise NDSError(
            f"layout offsets must rise from 0 to N={order.size}: the layout files come from "
            "different index versions (rebuild it with build_cluster_layout)"
        )
    return order, offsets


# --------------------------------------------------------------------------- validation


def _as_assignments(assignments) -> np.ndarray:
    a = np.asarray(assignments)
    if a.ndim != 1:
        raise NDSError(f"assignments must be a (N,) array of cluster ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise NDSError(f"assignments must be integer cluster ids, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and a.min() < 0:
        raise NDSError(f"assignments contain negative cluster id {int(a.min())}: ids must be in [0, K)")
    return a


def _as_probabilities(probabilities) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise NDSError(f"probabilities must be a non-empty (N,) array, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise NDSError("probabilities contain NaN or infinite values: recompute them with compute_sample_probabilities")
    if p.min() < 0:
        raise NDSError(f"probabilities contain negative values (min {p.min():.3g}): they must be >= 0")
    total = float(p.sum())
    if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise NDSError(
            f"probabilities sum to {total:.9g}, not 1: normalise them (compute_sample_probabilities does)"
        )
    return p if total == 1.0 else p / total
