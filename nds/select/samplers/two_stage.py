"""two-stage: the es-keys law with O(K + B) random numbers, from p and the hard clusters.

Stage 1 (which clusters, in which order) is shared with the clustered sampler
(nds.select.samplers.kernels); stage 2 finds "the r-th member of cluster c" by grouping the
members by cluster block by block, in O(N) work but cache-sized pieces.
"""

from __future__ import annotations

import numpy as np

from nds._registry import SAMPLERS
from nds.errors import InvalidInputError
from nds.index.layout import narrow_codes
from nds.select.probability import as_assignments
from nds.select.samplers.kernels import arrival_windows, rank_arrivals

# two-stage treats the members of a cluster as exchangeable, which is only exact if
# they share one probability. compute_sample_probabilities gives them bitwise-equal
# values; the slack admits a float32 round trip (6e-8 relative) and nothing coarser.
CLUSTER_CONSTANT_RTOL = 1e-6


@SAMPLERS.register("two-stage")
def draw_two_stage(p: np.ndarray, budget: int, *, rng: np.random.Generator, assignments=None) -> np.ndarray:
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
        raise InvalidInputError("method 'two-stage' needs assignments (the (N,) cluster id of each sample)")
    a = as_assignments(assignments)
    if a.shape != p.shape:
        raise InvalidInputError(f"assignments has shape {a.shape} but probabilities has {p.shape}: pass the same N samples")
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
        raise InvalidInputError(
            f"method 'two-stage' needs one probability per cluster, but cluster {c} has members "
            f"from {groups.p_min[c]:.3g} to {groups.p_max[c]:.3g}: use method='es-keys' for these probabilities"
        )
    n_c = groups.counts.sum(axis=0)
    rates, windows, m_c = arrival_windows(n_c, groups.p_max, budget, rng=rng)
    slot = rank_arrivals(rates, windows, budget, rng=rng)

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
        codes = narrow_codes(a[lo:hi], k)
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
