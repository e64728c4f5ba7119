"""The draw from p: select_samples with the es-keys and two-stage samplers, and the SAMPLERS registry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from nds._registry import SAMPLERS
from nds.errors import InvalidInputError, NDSError
from nds.select.probability import compute_expert_weights, compute_sample_probabilities
from nds.select.samplers import DEFAULT_SAMPLER, probability_samplers, select_samples
from nds.select.samplers import two_stage
from selectfixtures import corpora

# A goodness-of-fit test this strict fails by chance 1 time in 1000 per assertion; the
# seeds are fixed, so a pass here is a pass forever.
GOF_ALPHA = 1e-3


def _successive_pair_probabilities(p: np.ndarray) -> dict[tuple[int, int], float]:
    """Exact P(first = i, second = j) of successive sampling without replacement."""
    return {(i, j): p[i] * p[j] / (1 - p[i]) for i, j in itertools.permutations(range(p.size), 2)}




# --------------------------------------------------------------------------- registry


def test_registry_lists_the_samplers_and_default():
    assert set(probability_samplers()) == {"es-keys", "two-stage"}
    assert SAMPLERS.names() == ["es-keys", "two-stage", "clustered"]  # the CLI offers "auto" + these
    assert DEFAULT_SAMPLER in probability_samplers()
    for sampler in SAMPLERS.values():
        assert sampler.__doc__ and len(sampler.__doc__) > 200


def test_registry_unknown_sampler_lists_the_choices():
    with pytest.raises(InvalidInputError, match="unknown sampler 'magic': choose one of es-keys, two-stage, clustered"):
        SAMPLERS["magic"]


def test_select_samples_unknown_method_is_invalid_input():
    with pytest.raises(InvalidInputError, match=r"unknown selection method 'magic'.*'es-keys', 'two-stage'"):
        select_samples(np.array([0.5, 0.5]), 1, seed=0, method="magic")


def test_select_samples_refuses_the_layout_sampler():
    # "clustered" draws from the cluster layout and expert weights, not from p.
    with pytest.raises(InvalidInputError, match="cluster layout.*select_samples_clustered"):
        select_samples(np.array([0.5, 0.5]), 1, seed=0, method="clustered", assignments=np.array([0, 1]))


# --------------------------------------------------------------------------- draw


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


@pytest.mark.parametrize("method", sorted(probability_samplers()))
def test_select_all_eligible_returns_every_eligible_sample(method):
    p = np.array([0.25, 0.0, 0.25, 0.25, 0.25, 0.0])
    a = np.array([0, 1, 0, 2, 2, 1])
    out = select_samples(p, 4, seed=3, method=method, assignments=a)
    assert sorted(out.tolist()) == [0, 2, 3, 4]


@pytest.mark.parametrize("method", sorted(probability_samplers()))
def test_same_seed_same_selection_other_seed_differs(method):
    a = np.arange(1000) % 7
    p = compute_sample_probabilities(a, compute_expert_weights(np.arange(7.0), temperature=3.0))
    first = select_samples(p, 20, seed=11, method=method, assignments=a)
    again = select_samples(p, 20, seed=11, method=method, assignments=a)
    other = select_samples(p, 20, seed=12, method=method, assignments=a)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@settings(max_examples=60, deadline=None)
@given(corpus=corpora(), data=st.data(), seed=st.integers(0, 2**32 - 1), method=st.sampled_from(sorted(probability_samplers())))
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
    for method in probability_samplers():
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
    for method in probability_samplers():
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
    monkeypatch.setattr(two_stage, "GROUP_BLOCK", 16)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 9, 1000)
    eligible = rng.random(1000) < 0.7
    p = compute_sample_probabilities(a, compute_expert_weights(rng.normal(size=9), temperature=1.0), eligible=eligible)
    out = select_samples(p, 500, seed=2, method="two-stage", assignments=a)
    assert np.unique(out).size == 500 and eligible[out].all()
    counts = np.bincount(a[out], minlength=9)
    assert (counts <= np.bincount(a[eligible], minlength=9)).all()
