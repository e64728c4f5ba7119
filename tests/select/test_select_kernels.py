"""Stage-1 windows and the packed-key integer sorts the cluster samplers run on."""

from __future__ import annotations

import numpy as np
import pytest

from nds.select.samplers import kernels


# --------------------------------------------------------------------------- packed-key sorts


@pytest.mark.parametrize("case", ["random", "repeats", "shared_quanta", "exponents", "zeros", "negative", "one"])
def test_argsort_times_is_the_stable_argsort(case):
    rng = np.random.default_rng(7)
    t = {
        "random": rng.random(5000) * 3.0,
        "repeats": rng.integers(0, 40, 5000) * (3.0 / 40),  # exact ties: index order decides
        # Values closer than one quantum (2**-40 relative at 3,000 times) share a key: exact order restored.
        "shared_quanta": 1.0 + rng.integers(0, 8, 3000) * 2.0**-52,
        "exponents": np.exp(rng.uniform(-700, 700, 5000)),  # keys compare across binary exponents
        "zeros": np.where(rng.random(5000) < 0.1, 0.0, rng.random(5000)),
        "negative": np.concatenate([rng.random(100), [-0.0, -1e-300]]),  # not produced: falls back
        "one": np.array([0.5]),
    }[case]
    np.testing.assert_array_equal(kernels._argsort_times(t), np.argsort(t, kind="stable"))


@pytest.mark.parametrize("bound", [50, 2**40, 2**62])  # uint32 sort; packed sort; too wide to pack -> np.unique
def test_first_occurrences_marks_each_value_once_at_its_first_index(bound):
    values = np.random.default_rng(8).integers(0, 50, 2000)
    expected = np.zeros(values.size, bool)
    expected[np.unique(values, return_index=True)[1]] = True
    np.testing.assert_array_equal(kernels.first_occurrences(values, bound), expected)
    assert not kernels.first_occurrences(np.empty(0, np.int64), 1).size


# --------------------------------------------------------------------------- windows


def test_windows_are_actually_split(monkeypatch):
    monkeypatch.setattr(kernels, "WINDOW_OVERSHOOT_SD", 0.0)
    monkeypatch.setattr(kernels, "WINDOW_MIN_SLACK", -0.5)
    q = np.full(3, 1 / 6)
    rates, windows, m = kernels.arrival_windows(np.array([2, 3, 1]), q, 2, rng=np.random.default_rng(0))
    assert len(windows) >= 2 and m.sum() >= 2
