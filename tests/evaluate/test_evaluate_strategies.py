"""The evaluation strategies: one registry, seeded selections, domain precision."""

from __future__ import annotations

import numpy as np
import pytest

from nds._registry import EVAL_STRATEGIES
from nds.errors import InvalidInputError
from nds.evaluate.strategies import BUDGETED, SourcePool, domain_precision, select_for_strategy


def _pool(n: int = 20) -> SourcePool:
    datasets = np.array(["mnist", "glyphs"] * (n // 2))
    labels = np.array([f"{d}:0" for d in datasets])
    ids = [f"s{i}" for i in range(n)]
    return SourcePool(None, np.zeros((n, 32, 32, 3), np.uint8), labels, datasets, {s: i for i, s in enumerate(ids)})


def test_the_registry_lists_the_strategies_in_report_order():
    assert EVAL_STRATEGIES.names() == ["nds", "uniform", "all", "none"]
    assert set(BUDGETED) <= set(EVAL_STRATEGIES.names())


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(InvalidInputError, match="unknown evaluation strategy 'best': choose one of nds, uniform, all, none"):
        select_for_strategy(None, _pool(), "best", 5, seed=0)


def test_uniform_is_seeded_sorted_and_of_the_budget():
    pool = _pool()
    a = select_for_strategy(None, pool, "uniform", 5, seed=3)
    assert a.dtype == np.int64 and len(a) == 5 and len(set(a.tolist())) == 5
    assert np.array_equal(a, np.sort(a))
    assert np.array_equal(a, select_for_strategy(None, pool, "uniform", 5, seed=3))
    assert not np.array_equal(a, select_for_strategy(None, pool, "uniform", 5, seed=4))


def test_all_and_none_ignore_the_budget():
    pool = _pool()
    assert np.array_equal(select_for_strategy(None, pool, "all", 0, seed=0), np.arange(pool.size))
    assert len(select_for_strategy(None, pool, "none", 0, seed=0)) == 0


@pytest.mark.parametrize("budget", [0, 21])
def test_budgeted_strategies_check_the_budget(budget):
    with pytest.raises(InvalidInputError, match="between 1 and the 20 source samples"):
        select_for_strategy(None, _pool(), "uniform", budget, seed=0)


def test_nds_needs_the_client_scores():
    with pytest.raises(InvalidInputError, match="needs the client's scores"):
        select_for_strategy(None, _pool(), "nds", 5, seed=0)


def test_domain_precision():
    pool = _pool()
    assert domain_precision(pool, np.array([0, 2, 3]), "mnist") == pytest.approx(2 / 3)
    assert domain_precision(pool, np.array([0, 2]), None) is None
    assert domain_precision(pool, np.empty(0, np.int64), "mnist") is None
