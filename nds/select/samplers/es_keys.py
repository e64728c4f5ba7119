"""es-keys: exact weighted sampling without replacement from per-sample probabilities, O(N)."""

from __future__ import annotations

import numpy as np

from nds._registry import SAMPLERS


@SAMPLERS.register("es-keys")
def draw_es_keys(p: np.ndarray, budget: int, *, rng: np.random.Generator, assignments=None) -> np.ndarray:
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
