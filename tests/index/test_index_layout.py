"""The cluster layout (nds.index.layout): build, save/load round trip, validation."""

from __future__ import annotations

import numpy as np
import pytest

from nds.errors import NDSError
from nds.index import layout as layout_module
from nds.index.layout import build_cluster_layout, load_cluster_layout, save_cluster_layout
from nds.select.probability import compute_expert_weights
from nds.select.samplers.clustered import select_samples_clustered


def test_layout_tiny_exact():
    order, offsets = build_cluster_layout(np.array([2, 0, 2, 1, 0]), 4)
    assert order.tolist() == [1, 4, 3, 0, 2]
    assert offsets.tolist() == [0, 2, 3, 5, 5]
    assert order.dtype == np.int32


def test_layout_blockwise_matches_one_sort(monkeypatch):
    monkeypatch.setattr(layout_module, "LAYOUT_BLOCK", 7)
    a = np.random.default_rng(0).integers(0, 5, 103)
    order, offsets = build_cluster_layout(a, 6)
    np.testing.assert_array_equal(order, np.argsort(a, kind="stable"))
    np.testing.assert_array_equal(np.diff(offsets), np.bincount(a, minlength=6))


def test_layout_round_trip_memory_mapped(tmp_path):
    a = np.random.default_rng(1).integers(0, 3, 50)
    layout = build_cluster_layout(a, 3)
    save_cluster_layout(layout, tmp_path / "layout")
    order, offsets = load_cluster_layout(tmp_path / "layout")
    assert isinstance(order, np.memmap)
    np.testing.assert_array_equal(order, layout[0])
    w = compute_expert_weights([0.0, 1.0, 2.0], temperature=1.0)
    np.testing.assert_array_equal(select_samples_clustered((order, offsets), w, 10, seed=3),
                                  select_samples_clustered(layout, w, 10, seed=3))


@pytest.mark.parametrize(
    "assignments, k, fragment",
    [
        (np.array([0, 3]), 3, "ids must lie"),
        (np.array([-1, 0]), 3, "ids must lie"),
        (np.array([[0, 1]]), 3, "integer cluster ids"),
        (np.array([0.5]), 3, "integer cluster ids"),
        (np.array([0, 1]), 0, "positive int"),
    ],
)
def test_layout_rejects_bad_input(assignments, k, fragment):
    with pytest.raises(NDSError, match=fragment):
        build_cluster_layout(assignments, k)


def test_load_layout_missing(tmp_path):
    with pytest.raises(NDSError, match="missing"):
        load_cluster_layout(tmp_path)
