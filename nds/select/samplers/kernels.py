"""Stage 1 of the cluster samplers, and the packed-key integer sorts they run on.

Stage 1 (shared by two-stage and clustered): how many of the B earliest arrivals of the
competing exponential clocks fall in each cluster (arrival_windows), then their rank
order (rank_arrivals). The sorts: numpy sorts plain integers with SIMD far faster than it
argsorts floats, so times and repeat checks are sorted as uint64 keys with the index in
the low bits (_argsort_times, first_occurrences).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from nds.index.layout import narrow_codes

# --------------------------------------------------------------------------- stage 1: arrival windows


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


class _Window(NamedTuple):
    """One time window of stage 1: [start, start + width) (width inf: every remaining clock)."""

    start: float
    width: float
    inside: np.ndarray  # (K,) chance that a remaining clock of each cluster rings inside
    count: np.ndarray  # (K,) int64 arrivals of each cluster inside


def arrival_windows(n_c: np.ndarray, q: np.ndarray, budget: int, *, rng: np.random.Generator):
    """Stage 1a of the two-stage draw (see two_stage.draw_two_stage): how many arrivals per cluster.

    n_c: (K,) int eligible members per cluster; q: (K,) float per-member probability
    (> 0 wherever n_c > 0). Opens windows until they hold >= budget arrivals; O(K) each.
    Returns (rates (K,), windows, m): m (K,) int64 arrivals per cluster over all windows,
    at least the ranks each cluster gets. Arrivals are numbered cluster-major ("slots":
    cluster c owns [start_c, start_c + m_c), start = cumsum(m) - m), windows in order
    within a cluster. Only their times are left to draw (rank_arrivals), so stage 2
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


def rank_arrivals(rates: np.ndarray, windows: list, budget: int, *, rng: np.random.Generator) -> np.ndarray:
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
    window_major = np.concatenate([np.repeat(narrow_codes(np.arange(k), k), w.count) for w in windows])
    slot = np.empty(window_major.size, dtype=np.int64)
    slot[np.argsort(window_major, kind="stable")] = np.arange(window_major.size)
    return slot[first]


# --------------------------------------------------------------------------- packed-key sorts


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


def first_occurrences(values: np.ndarray, bound: int) -> np.ndarray:
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
    """first_occurrences by one packed-key sort (value high, index low), like _argsort_times'."""
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
