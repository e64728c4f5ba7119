"""Selection: expert weights, per-sample probabilities, budget, and the exact draw."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from nds.errors import NDSError
from nds.select.sampling import (
    DEFAULT_SAMPLER,
    SAMPLERS,
    compute_expert_weights,
    compute_sample_probabilities,
    resolve_budget,
    select_samples,
)

# A goodness-of-fit test this strict fails by chance 1 time in 1000 per assertion; the
# seeds are fixed, so a pass here is a pass forever.
GOF_ALPHA = 1e-3


def _successive_pair_probabilities(p: np.ndarray) -> dict[tuple[int, int], float]:
    """Exact P(first = i, second = j) of successive sampling without replacement."""
    return {(i, j): p[i] * p[j] / (1 - p[i]) for i, j in itertools.permutations(range(p.size), 2)}


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


@st.composite
def corpora(draw, max_n=40, max_k=6):
    """(assignments, scores, temperature, eligible) for a small corpus."""
    k = draw(st.integers(1, max_k))
    n = draw(st.integers(1, max_n))
    assignments = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    scores = draw(st.lists(st.floats(-10, 10), min_size=k, max_size=k))
    temperature = draw(st.floats(0.05, 10))
    eligible = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return assignments, scores, temperature, eligible


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


# --------------------------------------------------------------------------- draw


def test_registry_has_both_samplers_and_default():
    assert set(SAMPLERS) == {"es-keys", "two-stage"}
    assert DEFAULT_SAMPLER in SAMPLERS
    for sampler in SAMPLERS.values():
        assert sampler.__doc__ and len(sampler.__doc__) > 200


P4 = np.array([0.1, 0.2, 0.3, 0.4])
A4 = np.array([0, 1, 2, 3])


@pytest.mark.parametrize(
    "probabilities, budget, kwargs, fragment",
    [
        (P4, 0, {}, ">= 1"),
        (P4, 5, {}, "4 eligible"),
        (np.array([0.5, 0.5, 0.0]), 3, {}, "2 eligible"),
        (P4, 2.0, {}, "int count"),
        (P4, True, {}, "int count"),
        (np.array([0.5, -0.1, 0.6]), 1, {}, "negative"),
        (np.array([0.5, np.nan, 0.5]), 1, {}, "NaN"),
        (np.array([0.5, 0.6]), 1, {}, "sum to"),
        (np.array([]), 1, {}, "non-empty"),
        (P4, 1, {"method": "magic"}, "unknown selection method"),
        (P4, 1, {"method": "two-stage"}, "needs assignments"),
        (P4, 1, {"method": "two-stage", "assignments": np.array([0, 1])}, "shape"),
        (P4, 1, {"method": "two-stage", "assignments": np.array([0, 0, 1, 1])}, "one probability per cluster"),
        (P4, 1, {"seed": -1}, "seed"),
    ],
)
def test_select_samples_rejects_bad_input(probabilities, budget, kwargs, fragment):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(NDSError, match=fragment):
        select_samples(probabilities, budget, **kwargs)


def test_select_samples_renormalises_tiny_float_error():
    p = P4 * (1 + 1e-9)
    out = select_samples(p, 2, seed=0)
    assert out.dtype == np.int64 and out.size == 2


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_select_all_eligible_returns_every_eligible_sample(method):
    p = np.array([0.25, 0.0, 0.25, 0.25, 0.25, 0.0])
    a = np.array([0, 1, 0, 2, 2, 1])
    out = select_samples(p, 4, seed=3, method=method, assignments=a)
    assert sorted(out.tolist()) == [0, 2, 3, 4]


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_same_seed_same_selection_other_seed_differs(method):
    a = np.arange(1000) % 7
    p = compute_sample_probabilities(a, compute_expert_weights(np.arange(7.0), temperature=3.0))
    first = select_samples(p, 20, seed=11, method=method, assignments=a)
    again = select_samples(p, 20, seed=11, method=method, assignments=a)
    other = select_samples(p, 20, seed=12, method=method, assignments=a)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@settings(max_examples=60, deadline=None)
@given(corpus=corpora(), data=st.data(), seed=st.integers(0, 2**32 - 1), method=st.sampled_from(sorted(SAMPLERS)))
def test_selection_properties(corpus, data, seed, method):
    assignments, scores, temperature, eligible = corpus
    assume(eligible.any())
    p = compute_sample_probabilities(
        assignments, compute_expert_weights(scores, temperature=temperature), eligible=eligible
    )
    n_positive = int((p > 0).sum())
    budget = data.draw(st.integers(1, n_positive))
    out = select_samples(p, budget, seed=seed, method=method, assignments=assignments)
    assert out.shape == (budget,) and out.dtype == np.int64
    assert np.unique(out).size == budget
    assert (p[out] > 0).all() and eligible[out].all()
    np.testing.assert_array_equal(out, select_samples(p, budget, seed=seed, method=method, assignments=assignments))


def test_low_temperature_selects_only_from_best_cluster():
    a = np.repeat(np.arange(4), 25)
    p = compute_sample_probabilities(a, compute_expert_weights([0.1, 0.9, 0.5, 0.2], temperature=1e-3))
    for method in SAMPLERS:
        out = select_samples(p, 25, seed=0, method=method, assignments=a)
        assert (a[out] == 1).all()


def test_first_draw_follows_p_es_keys():
    p = np.array([0.05, 0.1, 0.15, 0.2, 0.22, 0.28])
    n_draws = 20000
    first = np.array([select_samples(p, 1, seed=s)[0] for s in range(n_draws)])
    observed = np.bincount(first, minlength=p.size)
    assert stats.chisquare(observed, p * n_draws).pvalue > GOF_ALPHA


def test_first_draw_follows_p_two_stage():
    # Six singleton clusters: every sample has its own probability.
    p = np.array([0.05, 0.1, 0.15, 0.2, 0.22, 0.28])
    a = np.arange(6)
    n_draws = 4000
    first = np.array([select_samples(p, 1, seed=s, method="two-stage", assignments=a)[0] for s in range(n_draws)])
    observed = np.bincount(first, minlength=p.size)
    assert stats.chisquare(observed, p * n_draws).pvalue > GOF_ALPHA


@pytest.mark.parametrize("method, n_draws", [("es-keys", 12000), ("two-stage", 4000)])
def test_ordered_pairs_match_successive_sampling(method, n_draws):
    exact = _successive_pair_probabilities(P4)
    pairs = list(exact)
    counts = dict.fromkeys(pairs, 0)
    for s in range(n_draws):
        i, j = select_samples(P4, 2, seed=s, method=method, assignments=A4).tolist()
        counts[(i, j)] += 1
    observed = np.array([counts[q] for q in pairs])
    expected = np.array([exact[q] for q in pairs]) * n_draws
    assert stats.chisquare(observed, expected).pvalue > GOF_ALPHA
    # Inclusion probabilities, the quantity a user sees.
    inclusion = np.array([sum(v for (i, j), v in exact.items() if k in (i, j)) for k in range(4)])
    seen = np.array([sum(counts[q] for q in pairs if k in q) for k in range(4)]) / n_draws
    np.testing.assert_allclose(seen, inclusion, atol=5 * np.sqrt(0.25 / n_draws))


def test_two_stage_ordered_pairs_with_shared_clusters():
    # Clusters {0, 1} and {2, 3}: two-stage must treat members as exchangeable.
    p = np.array([0.1, 0.1, 0.4, 0.4])
    a = np.array([0, 0, 1, 1])
    exact = _successive_pair_probabilities(p)
    pairs = list(exact)
    n_draws = 4000
    counts = dict.fromkeys(pairs, 0)
    for s in range(n_draws):
        counts[tuple(select_samples(p, 2, seed=s, method="two-stage", assignments=a).tolist())] += 1
    observed = np.array([counts[q] for q in pairs])
    assert stats.chisquare(observed, np.array([exact[q] for q in pairs]) * n_draws).pvalue > GOF_ALPHA


def test_two_stage_per_cluster_counts_match_es_keys():
    rng = np.random.default_rng(5)
    k = 5
    a = rng.integers(0, k, 300)
    p = compute_sample_probabilities(a, compute_expert_weights([2.0, 0.5, 1.0, -1.0, 0.0], temperature=0.7))
    budget, n_seeds = 60, 2000
    per_method = {}
    for method in SAMPLERS:
        per_method[method] = np.array(
            [np.bincount(a[select_samples(p, budget, seed=s, method=method, assignments=a)], minlength=k)
             for s in range(n_seeds)]
        )
    es, ts = per_method["es-keys"], per_method["two-stage"]
    se = np.sqrt(es.var(axis=0) / n_seeds + ts.var(axis=0) / n_seeds)
    assert (np.abs(es.mean(axis=0) - ts.mean(axis=0)) <= 5 * se + 1e-9).all()
    # Whole distribution of the top cluster's count, not only its mean.
    top = int(np.argmax(es.mean(axis=0)))
    assert stats.ks_2samp(es[:, top], ts[:, top]).pvalue > GOF_ALPHA
    # Rank 0 lands in each cluster with probability = that cluster's total mass.
    first = np.array([a[select_samples(p, 1, seed=s, method="two-stage", assignments=a)[0]] for s in range(n_seeds)])
    mass = np.bincount(a, weights=p, minlength=k)
    assert stats.chisquare(np.bincount(first, minlength=k), mass * n_seeds).pvalue > GOF_ALPHA


def test_two_stage_many_windows_large_budget():
    # Budget close to N forces the "take everything" window and many clusters.
    a = np.arange(5000) % 300
    p = compute_sample_probabilities(a, compute_expert_weights(np.linspace(0, 3, 300), temperature=0.5))
    out = select_samples(p, 4990, seed=1, method="two-stage", assignments=a)
    assert np.unique(out).size == 4990


def test_two_stage_grouping_across_blocks(monkeypatch):
    # Small blocks exercise the block bookkeeping with many blocks and ineligible gaps.
    from nds.select import sampling as selection
    monkeypatch.setattr(selection, "GROUP_BLOCK", 16)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 9, 1000)
    eligible = rng.random(1000) < 0.7
    p = compute_sample_probabilities(a, compute_expert_weights(rng.normal(size=9), temperature=1.0), eligible=eligible)
    out = select_samples(p, 500, seed=2, method="two-stage", assignments=a)
    assert np.unique(out).size == 500 and eligible[out].all()
    counts = np.bincount(a[out], minlength=9)
    assert (counts <= np.bincount(a[eligible], minlength=9)).all()
