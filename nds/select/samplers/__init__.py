"""The samplers: budgeted draws without replacement, all of one law, differing only in cost.

Each draws `budget` distinct samples, each draw proportional to p among the samples not
drawn yet (successive sampling). Every sampler registers itself in nds._registry.SAMPLERS:

    es-keys    from p, O(N)                               (es_keys.py)
    two-stage  from p and the hard clusters, O(K + B) random numbers, O(N) work (two_stage.py)
    clustered  from the expert weights and the index's cluster layout, O(K + B) (clustered.py)

select_samples runs the samplers that draw from p; "clustered" reads the layout instead
(clustered.select_samples_clustered). Which one a selection uses ("auto") is decided in nds.select.service.
draw_with_reserve adds reserve rows (`fill`) after a budget without changing the budget's rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from numbers import Integral

import numpy as np

from nds._registry import SAMPLERS
from nds.errors import InvalidInputError
from nds.select.probability import as_probabilities, check_budget
# Each module registers its sampler on import; this order is the order SAMPLERS.names() lists.
from nds.select.samplers import es_keys, two_stage, clustered  # noqa: F401, I001

log = logging.getLogger(__name__)

DEFAULT_SAMPLER = "es-keys"

#: Samplers that draw from the index's cluster layout (select_samples_clustered), not from p.
LAYOUT_SAMPLERS = ("clustered",)
#: Samplers whose draw of B' > B samples begins with their draw of B (same inputs and seed).
#: es-keys: the B smallest arrival times are the first B of the B' smallest. Not two-stage or
#: clustered: their time windows are sized to the budget, so B' consumes the random stream
#: differently (unless one window holds every eligible sample).
PREFIX_SAMPLERS = ("es-keys",)
#: Mixed into the seed of a reserve drawn after the budget (draw_with_reserve).
RESERVE_STREAM = 0x7265736572766500  # "reserve"


def reserve_count(budget: int, fill: float) -> int:
    """Reserve rows for a fill share: ceil(budget * (1 + fill)) - budget (0 <= fill <= 1)."""
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not (0.0 <= float(fill) <= 1.0):
        raise InvalidInputError(f"fill must be a share between 0 and 1 (e.g. 0.2 for 20 % reserve rows), got {fill!r}")
    # round first: 1000 * 0.07 is 70.00000000000001 in binary, and ceil would make it 71
    return math.ceil(round(budget * float(fill), 9))


def reserve_seed(seed: int) -> int:
    """The seed of the reserve draw after a budget drawn with `seed` (independent of it)."""
    return int(np.random.SeedSequence([RESERVE_STREAM, int(seed)]).generate_state(1, dtype=np.uint64)[0])


def draw_with_reserve(draw: Callable[[int, int, np.ndarray | None], np.ndarray], budget: int, reserve: int,
                      *, seed: int, method: str) -> np.ndarray:
    """`budget + reserve` samples in rank order whose first `budget` are exactly draw(budget, seed, None).

    draw(n, seed, drawn): n distinct samples by `method`, never one of `drawn` (int array or None).
    A PREFIX_SAMPLERS method draws budget + reserve at once. The others draw the budget, then the
    reserve from the samples left with reserve_seed(seed): successive sampling's law of draws
    budget+1 .. budget+reserve given the first budget, so either way the rows are one draw of
    budget + reserve from the same law, and the budget's rows do not depend on the reserve.
    """
    if reserve <= 0 or method in PREFIX_SAMPLERS:
        return draw(budget + max(0, reserve), seed, None)
    first = draw(budget, seed, None)
    return np.concatenate([first, draw(reserve, reserve_seed(seed), first)])


def probability_samplers() -> list[str]:
    """The registered samplers select_samples runs: those that draw from per-sample probabilities."""
    return [name for name in SAMPLERS.names() if name not in LAYOUT_SAMPLERS]


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
    method: one of probability_samplers(); every sampler draws from the same distribution.
    assignments: (N,) int cluster ids, required by 'two-stage'.
    Returns (B,) int64 sample indices in rank order (rank 0 = drawn first).
    """
    p = as_probabilities(probabilities)
    choices = probability_samplers()
    if method not in choices:
        if method in SAMPLERS:
            raise InvalidInputError(
                f"method {method!r} draws from the index's cluster layout, not from probabilities: "
                f"call select_samples_clustered, or choose one of {choices} here"
            )
        raise InvalidInputError(f"unknown selection method {method!r}: choose one of {choices}")
    n_positive = int(np.count_nonzero(p))
    check_budget(budget, n_positive)
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative int, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    chosen = SAMPLERS[method](p, int(budget), rng=rng, assignments=assignments)
    log.info("selected %d of %d eligible samples with %s (seed %d)", budget, n_positive, method, seed)
    return chosen.astype(np.int64, copy=False)
