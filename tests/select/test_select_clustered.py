"""The clustered fast path: select_samples_clustered (O(K + B) draw) on the index's cluster layout."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from nds.errors import NDSError
from nds.index.layout import build_cluster_layout
from nds.select.probability import compute_expert_weights, compute_sample_probabilities
from nds.select.samplers import clustered, kernels, select_samples
from nds.select.samplers.clustered import select_samples_clustered

# Same convention as test_select_samplers.py: fixed seeds, 1-in-1000 false alarm per assertion.
GOF_ALPHA = 1e-3


def _exact_pairs(p: np.ndarray) -> dict[tuple[int, int], float]:
    """P(first = i, second = j) of successive sampling proportional to p."""
    idx = np.flatnonzero(p > 0)
    return {(i, j): p[i] * p[j] / (1 - p[i]) for i, j in itertools.permutations(idx.tolist(), 2)}


def _assert_pairs_follow_successive_sampling(a, w, *, n_draws=6000, excluded=None):
    """The first two draws of select_samples_clustered, over n_draws seeds, vs the exact law."""
    eligible = np.ones(a.size, bool) if excluded is None else ~np.isin(np.arange(a.size), excluded)
    exact = _exact_pairs(compute_sample_probabilities(a, w, eligible=eligible))
    layout = build_cluster_layout(a, w.size)
    counts: dict = {}
    for s in range(n_draws):
        key = tuple(select_samples_clustered(layout, w, 2, seed=s, excluded=excluded, assignments=a).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(exact)
    pairs = sorted(exact)
    observed = np.array([counts.get(q, 0) for q in pairs])
    assert stats.chisquare(observed, np.array([exact[q] for q in pairs]) * n_draws).pvalue > GOF_ALPHA


# --------------------------------------------------------------------------- draw: contract


A7 = np.array([0, 0, 1, 1, 1, 2, 3])
W4 = compute_expert_weights([0.0, 0.5, 1.0, -1.0], temperature=1.0)


@pytest.mark.parametrize(
    "weights, budget, kwargs, fragment",
    [
        (W4[:3], 1, {}, "different K"),
        (W4, 0, {}, ">= 1"),
        (W4, 8, {}, "exceeds"),
        (W4, 1.5, {}, "int count"),
        (W4, 1, {"seed": -1}, "seed"),
        (np.array([1.0, -1.0, 0.5, 0.5]), 1, {}, "non-negative"),
        (W4, 1, {"excluded": np.array([0])}, "needs assignments"),
        (W4, 1, {"excluded": np.array([9]), "assignments": A7}, "outside"),
        (W4, 1, {"excluded": np.array([0.0]), "assignments": A7}, "sample indices"),
        (W4, 1, {"excluded": np.array([0]), "assignments": A7[:3]}, "same index"),
        (W4, 6, {"excluded": np.array([0, 1]), "assignments": A7}, "exceeds"),
    ],
)
def test_clustered_rejects_bad_input(weights, budget, kwargs, fragment):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(NDSError, match=fragment):
        select_samples_clustered(build_cluster_layout(A7, 4), weights, budget, **kwargs)


def test_clustered_rejects_inconsistent_layout():
    order, offsets = build_cluster_layout(A7, 4)
    with pytest.raises(NDSError, match="rise from 0"):
        select_samples_clustered((order, offsets[:-1]), W4, 1, seed=0)
    with pytest.raises(NDSError, match="pair"):
        select_samples_clustered(order, W4, 1, seed=0)


def test_clustered_same_seed_same_selection_other_seed_differs():
    a = np.random.default_rng(3).integers(0, 20, 5000)
    layout = build_cluster_layout(a, 20)
    w = compute_expert_weights(np.linspace(0, 1, 20), temperature=0.2)
    first = select_samples_clustered(layout, w, 300, seed=11)
    np.testing.assert_array_equal(first, select_samples_clustered(layout, w, 300, seed=11))
    assert not np.array_equal(first, select_samples_clustered(layout, w, 300, seed=12))


def test_clustered_select_all_eligible():
    layout = build_cluster_layout(A7, 4)
    out = select_samples_clustered(layout, W4, 5, seed=0, excluded=np.array([1, 6]), assignments=A7)
    assert sorted(out.tolist()) == [0, 2, 3, 4, 5]


def test_clustered_zero_weight_cluster_never_drawn():
    w = np.array([0.0, 0.5, 0.5, 0.0])
    out = select_samples_clustered(build_cluster_layout(A7, 4), w, 4, seed=0)
    assert set(out.tolist()) == {2, 3, 4, 5}


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 8),
    data=st.data(),
)
def test_clustered_selection_properties(n, k, data):
    seed = data.draw(st.integers(0, 2**32))
    rng = np.random.default_rng(seed)
    a = rng.integers(0, k, n)
    excluded = np.flatnonzero(rng.random(n) < data.draw(st.sampled_from([0.0, 0.1, 0.7])))
    w = compute_expert_weights(rng.normal(size=k) * 3, temperature=data.draw(st.sampled_from([0.05, 1.0])))
    p = compute_sample_probabilities(a, w, eligible=~np.isin(np.arange(n), excluded)) if excluded.size < n else None
    if p is None or not (p > 0).any():
        return
    budget = data.draw(st.integers(1, int((p > 0).sum())))
    out = select_samples_clustered(build_cluster_layout(a, k), w, budget, seed=seed % 1000,
                                   excluded=excluded, assignments=a)
    assert out.shape == (budget,) and out.dtype == np.int64
    assert np.unique(out).size == budget
    assert (p[out] > 0).all()


# --------------------------------------------------------------------------- draw: law


@pytest.mark.parametrize("stage2", ["as-tuned", "all-dense", "all-sparse"])
@pytest.mark.parametrize("excluded", [None, np.array([3])])
def test_clustered_ordered_pairs_match_successive_sampling(monkeypatch, excluded, stage2):
    # Clusters {0, 1}, {2, 3, 4}, {5}: shared probabilities, one exclusion inside a cluster.
    # Both stage-2 paths (partial shuffle; rejection of repeats and exclusions) keep the law.
    if stage2 == "all-dense":
        monkeypatch.setattr(clustered, "DENSE_SHARE", 0.0)
    elif stage2 == "all-sparse":
        monkeypatch.setattr(clustered, "DENSE_SHARE", 1.0)
        monkeypatch.setattr(clustered, "EXCLUDED_DENSE_SHARE", 0.0)
    _assert_pairs_follow_successive_sampling(np.array([0, 0, 1, 1, 1, 2]), np.array([0.5, 0.3, 0.2]),
                                             excluded=excluded)


def test_clustered_sparse_path_first_draw_and_within_cluster_uniform():
    # Large clusters, small budget: stage 2 takes the rejection (sparse) path.
    rng = np.random.default_rng(4)
    k, n = 4, 400
    a = rng.integers(0, k, n)
    w = np.array([0.4, 0.3, 0.2, 0.1])
    excluded = np.flatnonzero(rng.random(n) < 0.2)
    eligible = ~np.isin(np.arange(n), excluded)
    p = compute_sample_probabilities(a, w, eligible=eligible)
    layout = build_cluster_layout(a, k)
    n_seeds = 3000
    picks = np.array([select_samples_clustered(layout, w, 5, seed=s, excluded=excluded, assignments=a)
                      for s in range(n_seeds)])
    # The first draw follows p (cluster level: per-cluster mass).
    mass = np.bincount(a, weights=p, minlength=k)
    assert stats.chisquare(np.bincount(a[picks[:, 0]], minlength=k), mass * n_seeds).pvalue > GOF_ALPHA
    # Inside cluster 0 every eligible member is equally likely, over all ranks.
    members = np.flatnonzero(eligible & (a == 0))
    hits = np.bincount(picks.ravel(), minlength=n)[members]
    assert stats.chisquare(hits).pvalue > GOF_ALPHA
    assert not np.isin(picks, excluded).any()


@pytest.mark.parametrize("budget", [40, 600])  # mostly sparse, mostly dense clusters
def test_clustered_per_cluster_counts_match_es_keys(budget):
    rng = np.random.default_rng(5)
    k, n = 12, 1000
    a = rng.integers(0, k, n)
    w = compute_expert_weights(rng.normal(size=k), temperature=0.5)
    p = compute_sample_probabilities(a, w)
    layout = build_cluster_layout(a, k)
    n_seeds = 400
    es = np.array([np.bincount(a[select_samples(p, budget, seed=s)], minlength=k) for s in range(n_seeds)])
    cl = np.array([np.bincount(a[select_samples_clustered(layout, w, budget, seed=s)], minlength=k)
                   for s in range(n_seeds)])
    top = int(np.argmax(w))
    assert stats.ks_2samp(es[:, top], cl[:, top]).pvalue > GOF_ALPHA
    # And the first-ranked cluster follows the cluster masses.
    firsts = np.array([a[select_samples_clustered(layout, w, budget, seed=10_000 + s)[0]] for s in range(n_seeds)])
    assert stats.chisquare(np.bincount(firsts, minlength=k), np.bincount(a, weights=p, minlength=k) * n_seeds
                           ).pvalue > GOF_ALPHA


def test_clustered_heavily_excluded_cluster_uses_its_eligible_members():
    a = np.repeat([0, 1], 1000)
    excluded = np.arange(0, 995)  # cluster 0 keeps 5 eligible members: the dense path
    w = np.array([0.9999, 0.0001])
    out = select_samples_clustered(build_cluster_layout(a, 2), w, 50, seed=0, excluded=excluded, assignments=a)
    assert not np.isin(out, excluded).any() and np.unique(out).size == 50
    assert set(range(995, 1000)) <= set(out.tolist())  # p of those 5 dominates


# --------------------------------------------------------------------------- windows and threads


# With the real constants a 2-of-6 draw opens one infinite window (every clock at once: the
# pair test above); these windows expect fewer arrivals than needed, so finite rounds repeat.
@pytest.mark.parametrize("slack", [-0.5, 0.5])
def test_short_windows_keep_the_law(monkeypatch, slack):
    monkeypatch.setattr(kernels, "WINDOW_OVERSHOOT_SD", 0.0)
    monkeypatch.setattr(kernels, "WINDOW_MIN_SLACK", slack)
    a = np.array([0, 0, 1, 1, 1, 2])
    w = np.array([0.5, 0.3, 0.2])
    _assert_pairs_follow_successive_sampling(a, w)
    layout = build_cluster_layout(a, 3)
    # A whole permutation takes many short windows: still every sample exactly once.
    assert sorted(select_samples_clustered(layout, w, 6, seed=1).tolist()) == list(range(6))


def test_two_threads_or_one_same_selection(monkeypatch):
    rng = np.random.default_rng(9)
    k, n = 20, 200_000
    a = rng.integers(0, k, n)
    w = compute_expert_weights(rng.normal(size=k), temperature=0.5)
    layout = build_cluster_layout(a, k)
    excluded = np.flatnonzero(rng.random(n) < 0.1)
    runs = []
    for threshold in (1, 10**12):
        monkeypatch.setattr(clustered, "THREAD_MIN_BUDGET", threshold)
        runs.append(select_samples_clustered(layout, w, 50_000, seed=3, excluded=excluded, assignments=a))
    np.testing.assert_array_equal(*runs)
    assert np.unique(runs[0]).size == 50_000 and not np.isin(runs[0], excluded).any()
