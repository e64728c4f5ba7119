import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nds._registry import WEIGHT_SCHEMES
from nds.errors import InvalidInputError, NDSError
from nds.index.weights import compute_inverse_cluster_size, compute_weights


def test_tiny_exact_case():
    w = compute_inverse_cluster_size(np.array([0, 0, 1, 2, 2, 2]), 3)
    np.testing.assert_allclose(w, [0.5, 0.5, 1.0, 1 / 3, 1 / 3, 1 / 3])


def test_out_of_range_assignment_is_rejected():
    with pytest.raises(NDSError, match=r"\[0, 2\)"):
        compute_inverse_cluster_size(np.array([0, 2]), 2)


def test_unknown_scheme_names_the_choices():
    with pytest.raises(NDSError, match="inverse_cluster_size"):
        compute_weights(np.array([0]), 1, scheme="magic")


def test_schemes_are_registered():
    assert WEIGHT_SCHEMES.names() == ["inverse_cluster_size"]
    assert WEIGHT_SCHEMES["inverse_cluster_size"] is compute_inverse_cluster_size
    with pytest.raises(InvalidInputError, match="unknown weight scheme 'magic'"):
        compute_weights(np.array([0]), 1, scheme="magic")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=300))
def test_weights_nonnegative_and_each_cluster_sums_to_one(labels):
    a = np.array(labels)
    w = compute_inverse_cluster_size(a, 8)
    assert (w >= 0).all()
    for k in np.unique(a):
        assert w[a == k].sum() == pytest.approx(1.0)
