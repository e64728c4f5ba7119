import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nds._registry import CLUSTERERS
from nds.config import Workspace
from nds.errors import InvalidInputError, NDSError
from nds.index.cluster import (
    allocate_clusters,
    assign_by_group,
    assign_kmeans,
    assign_kmeans_within,
    compute_cluster_sizes,
    compute_nmi,
)
from nds.index.stages import run_stage


def _blobs(seed=0, n=60):
    rng = np.random.default_rng(seed)
    centres = np.array([[10, 0, 0], [0, 10, 0], [0, 0, 10]], dtype=np.float32)
    truth = np.repeat(np.arange(3), n // 3)
    return centres[truth] + rng.normal(0, 0.3, (len(truth), 3)).astype(np.float32), truth


def test_kmeans_recovers_separated_blobs_and_numbers_by_size():
    x, truth = _blobs()
    a, c = assign_kmeans(x, k=3, seed=0)
    assert compute_nmi(a, truth) == pytest.approx(1.0)
    assert c.shape == (3, 3)
    sizes = compute_cluster_sizes(a, 3)
    assert (np.diff(sizes) <= 0).all()


def test_kmeans_is_deterministic_for_a_seed():
    x, _ = _blobs(seed=1)
    np.testing.assert_array_equal(assign_kmeans(x, k=4, seed=7)[0], assign_kmeans(x, k=4, seed=7)[0])


def test_kmeans_rejects_k_above_n_and_nan():
    x, _ = _blobs()
    with pytest.raises(NDSError, match="lower cluster.k"):
        assign_kmeans(x[:2], k=3)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(NDSError, match="NaN"):
        assign_kmeans(bad, k=2)


def test_label_partition_names_each_cluster():
    a, names = assign_by_group(np.array(["b", "a", "b", "c", "b"]))
    assert names[0] == "b" and sorted(names) == ["a", "b", "c"]
    assert [names[i] for i in a] == ["b", "a", "b", "c", "b"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from("abcde"), min_size=1, max_size=100))
def test_group_partition_is_a_partition(groups):
    a, names = assign_by_group(np.array(groups))
    assert len(names) == len(set(groups))
    assert compute_cluster_sizes(a, len(names)).sum() == len(groups)
    assert (compute_cluster_sizes(a, len(names)) > 0).all()


def test_kmeans_within_dataset_never_mixes_datasets_and_splits_k_by_size():
    x, truth = _blobs(n=90)
    # Two "datasets" that cut across the feature blobs: plain k-means would mix them.
    groups = np.where(np.arange(len(x)) % 3 == 0, "small", "big")
    a, c, owners = assign_kmeans_within(x, groups, k=6, seed=0)
    sizes = compute_cluster_sizes(a, len(owners))
    assert len(owners) == 6 and c.shape == (6, 3) and (sizes > 0).all()
    assert (np.diff(sizes) <= 0).all()  # numbered by size like plain k-means
    for cluster in range(len(owners)):
        members = groups[a == cluster]
        assert set(members) == {owners[cluster]}
    assert sum(o.startswith("big") for o in owners) == 4  # 60 of 90 samples -> 4 of 6 clusters
    np.testing.assert_array_equal(a, assign_kmeans_within(x, groups, k=6, seed=0)[0])


def test_kmeans_within_dataset_needs_one_cluster_per_dataset():
    x, _ = _blobs()
    with pytest.raises(NDSError, match="k >= 3"):
        assign_kmeans_within(x, np.array(list("abc") * 20), k=2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=8), st.integers(1, 60))
def test_cluster_allocation_is_proportional_and_feasible(sizes, k):
    sizes = np.array(sizes)
    alloc = allocate_clusters(sizes, k)
    nonempty = sizes > 0
    assert (alloc[~nonempty] == 0).all() and (alloc[nonempty] >= 1).all()
    assert (alloc <= sizes).all()
    assert alloc.sum() == min(max(k, int(nonempty.sum())), int(sizes.sum()))
    if nonempty.any() and nonempty.sum() <= k <= sizes.sum():
        quota = k * sizes / sizes.sum()
        # no group with a share of >= 1 cluster gets more than one cluster above it, and without
        # one-cluster minimums to pay for, none gets more than one below it either
        assert (alloc - quota)[quota >= 1].max(initial=0) < 1 + 1e-9
        if (quota[nonempty] >= 1).all() and (np.ceil(quota) <= sizes).all():
            assert np.abs(alloc - quota).max() < 1 + 1e-9


def test_cluster_allocation_examples():
    np.testing.assert_array_equal(allocate_clusters(np.array([50, 30, 20]), 10), [5, 3, 2])
    np.testing.assert_array_equal(allocate_clusters(np.array([55, 30, 15]), 10), [6, 3, 1])  # 5.5 gets the spare
    np.testing.assert_array_equal(allocate_clusters(np.array([1, 1, 100]), 5), [1, 1, 3])  # minimums come first
    np.testing.assert_array_equal(allocate_clusters(np.array([1, 0, 100]), 200), [1, 0, 100])  # capped by members


def test_clusterers_are_registered_in_their_order():
    assert CLUSTERERS.names()[:4] == ["kmeans", "dataset-kmeans", "dataset", "label"]
    with pytest.raises(InvalidInputError, match="unknown clustering method 'nope': choose one of kmeans, dataset-kmeans"):
        CLUSTERERS["nope"]


def test_dataset_kmeans_stage_keeps_every_cluster_inside_one_dataset(tiny_index, tmp_path):
    """The default clustering: k-means inside each source dataset, K split over them by size."""
    import json
    import shutil

    import numpy as np
    import yaml

    src, _ = tiny_index
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src.root, ws.root, ignore=shutil.ignore_patterns("*.duckdb*", ".cache"))
    params = yaml.safe_load(ws.params_path.read_text())
    params["cluster"].update(method="dataset-kmeans", k=12)
    ws.params_path.write_text(yaml.safe_dump(params))
    summary = run_stage("cluster", ws, progress=False)
    assert summary["method"] == "dataset-kmeans" and summary["k"] == 12
    mixes = json.loads((ws.stage_dir("cluster") / "clusters.json").read_text())["dataset_mix"]
    assert all(len(mix) == 1 for mix in mixes)  # no cluster straddles two datasets
    n_datasets = len({d for mix in mixes for d in mix})
    assert n_datasets >= 3 and len(mixes) > n_datasets  # some dataset was split by k-means
    assignments = np.load(ws.stage_dir("cluster") / "assignments.npy")
    assert np.bincount(assignments, minlength=12).sum() == len(assignments) and assignments.max() == 11
    # k below the number of datasets: a clear error, and the stage output is left as it was
    params["cluster"]["k"] = n_datasets - 1
    ws.params_path.write_text(yaml.safe_dump(params))
    with pytest.raises(NDSError, match=f"k >= {n_datasets}"):
        run_stage("cluster", ws, progress=False)
    assert np.array_equal(np.load(ws.stage_dir("cluster") / "assignments.npy"), assignments)
