import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nds.clustering import assign_by_group, assign_kmeans, compute_cluster_sizes, compute_nmi
from nds.errors import NDSError


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
