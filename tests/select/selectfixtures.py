"""Hypothesis strategies shared by the selection tests."""

import numpy as np
from hypothesis import strategies as st


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
