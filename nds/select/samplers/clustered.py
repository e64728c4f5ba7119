"""clustered: the two-stage draw from the index's cluster layout, O(K + B) work.

The fast path `nds select` takes by default: stage 1 (kernels) as in two-stage, and stage 2
reads only the drawn positions of the layout (nds.index.layout), so N matters only
through the exclusions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from numbers import Integral

import numpy as np

from nds._registry import SAMPLERS
from nds.errors import InvalidInputError
from nds.index.layout import as_layout, narrow_codes
from nds.select.probability import check_budget, compute_member_probabilities
from nds.select.samplers.kernels import arrival_windows, first_occurrences, rank_arrivals

log = logging.getLogger(__name__)

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


@SAMPLERS.register("clustered")
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

    Stage 1 (how many arrivals per cluster, then their rank order) is arrival_windows and
    rank_arrivals, exactly as in two-stage; it runs beside stage 2 on a second thread. Stage 2 gives
    cluster c's m_c arrival slots a uniformly random ordered m_c-subset of its eligible members:
    positions j in [0, n_c) are drawn uniformly, discarding repeats and excluded members
    (the sequential form of drawing without replacement, vectorised over clusters in
    rounds), or, for dense clusters (DENSE_SHARE, EXCLUDED_DENSE_SHARE), by a partial shuffle of the eligible members.
    """
    order, offsets = as_layout(layout)
    k = offsets.size - 1
    sizes = np.diff(offsets)
    w = np.asarray(expert_weights, dtype=np.float64)
    if w.shape != (k,):
        raise InvalidInputError(
            f"expert_weights has shape {w.shape} but the layout has {k} clusters: "
            "the scores and the index have different K (use the scores made for this index version)"
        )
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative int, got {seed!r}")
    excluded_sorted, excluded_counts = _excluded_by_cluster(excluded, assignments, order.size, k)
    eligible_counts = sizes - excluded_counts
    q = compute_member_probabilities(w, sizes, eligible_counts)
    n_c = np.where(q > 0, eligible_counts, 0)
    n_positive = int(n_c.sum())
    check_budget(budget, n_positive)
    rng = np.random.default_rng(int(seed))
    budget = int(budget)
    rates, windows, m_c = arrival_windows(n_c, q, budget, rng=rng)
    # Arrival times (stage 1b) and members (stage 2) use their own streams, so they can be
    # drawn at once on two threads (numpy releases the GIL) with the same result either way.
    time_rng, member_rng = rng.spawn(2)
    slot, members = _run_pair(
        partial(rank_arrivals, rates, windows, budget, rng=time_rng),
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
        first = first_occurrences(cand, offsets[-1])
        if excluded_sorted is not None:
            first[first] = ~_is_excluded(np.asarray(order[cand[first]], dtype=np.int64), excluded_sorted)
        cnt = have.copy()  # every kept member is a first occurrence and eligible
        cnt[active] += np.add.reduceat(first[kept.size :], np.cumsum(tries) - tries, dtype=np.int64)
        cand = cand[first]
        if kept.size:  # kept members came first: group by cluster again, keeping the draw order
            cluster = np.searchsorted(offsets, cand, side="right") - 1
            cand = cand[np.argsort(narrow_codes(cluster, k), kind="stable")]
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
        raise InvalidInputError(f"excluded must be a (M,) array of sample indices, got {x.dtype} {x.shape} "
                       "(from a bool mask use np.flatnonzero(~eligible))")
    if x.size == 0:
        return None, np.zeros(k, dtype=np.int64)
    x = np.unique(x.astype(np.int64))
    if x[0] < 0 or x[-1] >= n:
        raise InvalidInputError(f"excluded holds sample index {int(x[0] if x[0] < 0 else x[-1])} outside [0, {n})")
    if assignments is None:
        raise InvalidInputError("excluded needs assignments (the (N,) cluster id of each sample) to count exclusions per cluster")
    a = np.asarray(assignments)
    if a.shape != (n,):
        raise InvalidInputError(f"assignments has shape {a.shape} but the layout holds {n} samples: pass the same index")
    return x, np.bincount(np.asarray(a[x], dtype=np.int64), minlength=k)


def _is_excluded(samples: np.ndarray, excluded_sorted: np.ndarray) -> np.ndarray:
    at = np.searchsorted(excluded_sorted, samples)
    at[at == excluded_sorted.size] = 0
    return excluded_sorted[at] == samples
