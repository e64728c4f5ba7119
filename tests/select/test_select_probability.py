"""Selection probabilities: expert weights (softmax), per-sample and per-member probabilities, budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from nds.errors import NDSError
from nds.select.probability import (
    compute_expert_weights,
    compute_member_probabilities,
    compute_sample_probabilities,
    resolve_budget,
)
from selectfixtures import corpora


# --------------------------------------------------------------------------- weights


def test_expert_weights_tiny_exact():
    w = compute_expert_weights([0.0, math.log(3.0)], temperature=1.0)
    np.testing.assert_allclose(w, [0.25, 0.75])
    w2 = compute_expert_weights([0.0, 2 * math.log(3.0)], temperature=2.0)
    np.testing.assert_allclose(w2, [0.25, 0.75])


def test_expert_weights_stable_for_huge_scores():
    w = compute_expert_weights([1e308, -1e308, 1e308], temperature=1e-300)
    np.testing.assert_allclose(w, [0.5, 0.0, 0.5])


def test_low_temperature_picks_best_expert():
    w = compute_expert_weights([0.1, 0.9, 0.5, 0.2], temperature=1e-3)
    assert w[1] == pytest.approx(1.0, abs=1e-12)


def test_high_temperature_is_uniform_over_experts():
    w = compute_expert_weights([0.1, 0.9, 0.5, 0.2], temperature=1e6)
    np.testing.assert_allclose(w, 0.25, rtol=1e-5)


@pytest.mark.parametrize(
    "scores, temperature, fragment",
    [
        ([1.0, float("nan")], 1.0, "NaN"),
        ([1.0, float("inf")], 1.0, "infinite"),
        ([], 1.0, "non-empty"),
        ([[1.0, 2.0]], 1.0, "1-D"),
        (["a", "b"], 1.0, "scores"),
        ([1.0, 2.0], 0.0, "temperature"),
        ([1.0, 2.0], -1.0, "temperature"),
        ([1.0, 2.0], float("nan"), "temperature"),
        ([1.0, 2.0], float("inf"), "temperature"),
        ([1.0, 2.0], True, "temperature"),
    ],
)
def test_expert_weights_rejects_bad_input(scores, temperature, fragment):
    with pytest.raises(NDSError, match=fragment):
        compute_expert_weights(scores, temperature=temperature)


@given(
    scores=st.lists(st.floats(-50, 50), min_size=1, max_size=20),
    temperature=st.floats(1e-3, 1e6),
)
def test_expert_weights_are_a_distribution(scores, temperature):
    w = compute_expert_weights(scores, temperature=temperature)
    assert w.shape == (len(scores),)
    assert (w >= 0).all()
    assert w.sum() == pytest.approx(1.0)
    assert w[int(np.argmax(scores))] == w.max()


# --------------------------------------------------------------------------- probabilities


def test_sample_probabilities_tiny_exact():
    # Cluster 0 = {0, 1} with a = 0.25, cluster 1 = {2, 3, 4} with a = 0.75.
    p = compute_sample_probabilities([0, 0, 1, 1, 1], [0.25, 0.75])
    np.testing.assert_allclose(p, [0.125, 0.125, 0.25, 0.25, 0.25])


def test_sample_probabilities_renormalise_over_eligible():
    eligible = np.array([True, False, True, True, False])
    p = compute_sample_probabilities([0, 0, 1, 1, 1], [0.25, 0.75], eligible=eligible)
    # Unnormalised: 0.125, 0, 0.25, 0.25, 0 -> total 0.625.
    np.testing.assert_allclose(p, [0.2, 0.0, 0.4, 0.4, 0.0])


def test_sample_probabilities_use_stored_cluster_sizes():
    # The index says cluster 1 has 4 members; only 2 are passed here (a shard).
    p = compute_sample_probabilities([0, 1, 1], [0.5, 0.5], cluster_sizes=np.array([1, 4]))
    np.testing.assert_allclose(p, np.array([0.5, 0.125, 0.125]) / 0.75)


def test_sample_probabilities_drop_empty_clusters():
    p = compute_sample_probabilities([0, 0, 2], [0.2, 0.5, 0.3])
    # Cluster 1 has no member: its 0.5 is dropped, 0.1 + 0.1 + 0.3 renormalised by 0.5.
    np.testing.assert_allclose(p, [0.2, 0.2, 0.6])


def test_sample_probabilities_do_not_mutate_inputs():
    a = np.array([0, 1, 1])
    w = np.array([0.5, 0.5])
    e = np.array([True, True, False])
    compute_sample_probabilities(a, w, eligible=e)
    assert a.tolist() == [0, 1, 1] and w.tolist() == [0.5, 0.5] and e.tolist() == [True, True, False]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(assignments=[0, 3], expert_weights=[0.5, 0.5]), "only 2 expert weights"),
        (dict(assignments=[0, -1], expert_weights=[0.5, 0.5]), "negative"),
        (dict(assignments=[0.0, 1.0], expert_weights=[0.5, 0.5]), "integer"),
        (dict(assignments=[0, 1], expert_weights=[0.5, float("nan")]), "finite"),
        (dict(assignments=[0, 1], expert_weights=[0.0, 0.0]), "not all zero"),
        (dict(assignments=[0, 1], expert_weights=[0.5, 0.5], cluster_sizes=np.array([1, 0])), "is empty"),
        (dict(assignments=[0, 1], expert_weights=[0.5, 0.5], cluster_sizes=np.array([1])), "cluster_sizes"),
        (dict(assignments=[0, 1], expert_weights=[0.5, 0.5], eligible=np.array([1, 0])), "bool"),
        (dict(assignments=[0, 1], expert_weights=[0.5, 0.5], eligible=np.array([False, False])), "no eligible"),
        (dict(assignments=[0, 1], expert_weights=[0.0, 1.0], eligible=np.array([True, False])), "no eligible"),
    ],
)
def test_sample_probabilities_reject_bad_input(kwargs, fragment):
    a = kwargs.pop("assignments")
    w = kwargs.pop("expert_weights")
    with pytest.raises(NDSError, match=fragment):
        compute_sample_probabilities(a, w, **kwargs)




@given(corpora())
def test_sample_probabilities_are_a_distribution(corpus):
    assignments, scores, temperature, eligible = corpus
    assume(eligible.any())
    w = compute_expert_weights(scores, temperature=temperature)
    p = compute_sample_probabilities(assignments, w, eligible=eligible)
    assert p.shape == assignments.shape
    assert (p >= 0).all()
    assert p.sum() == pytest.approx(1.0)
    assert (p[~eligible] == 0).all()
    # Members of one cluster share one probability exactly.
    for c in np.unique(assignments[eligible]):
        assert np.unique(p[eligible & (assignments == c)]).size == 1


def test_member_probabilities_match_sample_probabilities():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 6, 200)
    eligible = rng.random(200) > 0.3
    w = compute_expert_weights(rng.normal(size=6), temperature=0.7)
    p = compute_sample_probabilities(a, w, eligible=eligible)
    q = compute_member_probabilities(w, np.bincount(a, minlength=6), np.bincount(a[eligible], minlength=6))
    np.testing.assert_array_equal(np.where(eligible, q[a], 0.0), p)


# --------------------------------------------------------------------------- budget


@pytest.mark.parametrize(
    "budget, n, expected",
    [(1, 10, 1), (10, 10, 10), (np.int64(3), 10, 3), (0.1, 1000, 100), (1.0, 7, 7), (0.001, 10, 1), (0.25, 10, 2)],
)
def test_resolve_budget(budget, n, expected):
    assert resolve_budget(budget, n) == expected


@pytest.mark.parametrize("budget", [0, -1, 1.5, 0.0, -0.1, True, float("nan"), float("inf"), "10", None, 11])
def test_resolve_budget_rejects(budget):
    with pytest.raises(NDSError):
        resolve_budget(budget, 10)


def test_resolve_budget_rejects_no_eligible():
    with pytest.raises(NDSError, match="no eligible"):
        resolve_budget(1, 0)
