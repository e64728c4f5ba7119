"""Reserve rows for dead links (`fill`): ceil(B (1 + F)) rows whose first B are exactly the B-draw."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from nds.errors import InvalidInputError
from nds.formats.manifest import load_manifest
from nds.index.layout import build_cluster_layout
from nds.select.samplers import draw_with_reserve, reserve_count, select_samples
from nds.select.samplers.clustered import select_samples_clustered

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from synthetic_index import synthetic_scores, write_synthetic_index  # noqa: E402

GOF_ALPHA = 1e-3  # as in test_select_samplers.py: fixed seeds, so a pass is a pass forever


@pytest.mark.parametrize("budget, fill, reserve", [(1000, 0.07, 70), (1000, 0.2, 200), (3, 0.1, 1), (10, 0.0, 0),
                                                  (5, 1.0, 5), (7, 0.5, 4)])
def test_reserve_is_the_ceiling_of_budget_times_fill(budget, fill, reserve):
    assert reserve_count(budget, fill) == reserve


@pytest.mark.parametrize("fill", [-0.1, 1.5, True, "0.2"])
def test_fill_outside_zero_one_is_refused(fill):
    with pytest.raises(InvalidInputError, match="fill must be a share between 0 and 1"):
        reserve_count(10, fill)


def _p(n: int = 2000, k: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, k, n)
    w = rng.dirichlet(np.ones(k))
    sizes = np.bincount(a, minlength=k)
    return a, w, w[a] / sizes[a]


def test_es_keys_draw_of_more_begins_with_the_draw_of_fewer():
    a, _, p = _p()
    for seed in range(20):
        assert select_samples(p, 36, seed=seed)[:30].tolist() == select_samples(p, 30, seed=seed).tolist()


@pytest.mark.parametrize("method", ["two-stage", "clustered"])
def test_window_samplers_have_no_prefix_property_so_the_reserve_comes_after(method):
    """Their windows are sized to the budget: one draw of 36 does not begin with the draw of 30."""
    a, w, p = _p()
    layout = build_cluster_layout(a, w.size)

    def draw(n, seed, drawn):
        if method == "clustered":
            return select_samples_clustered(layout, w, n, seed=seed, excluded=drawn, assignments=a)
        q = p.copy()
        if drawn is not None:
            q[drawn] = 0.0
        return select_samples(q / q.sum(), n, seed=seed, method=method, assignments=a)

    one_go_differs = 0
    for seed in range(20):
        first = draw(30, seed, None)
        one_go_differs += draw(36, seed, None)[:30].tolist() != first.tolist()
        both = draw_with_reserve(draw, 30, 6, seed=seed, method=method)
        assert both[:30].tolist() == first.tolist()
        assert np.unique(both).size == 36
    assert one_go_differs > 10


def test_reserve_after_the_budget_follows_successive_sampling():
    """B = 1 then a reserve of 1 (two-stage, shared clusters): ordered pairs have the exact law."""
    p = np.array([0.1, 0.1, 0.4, 0.4])
    a = np.array([0, 0, 1, 1])

    def draw(n, seed, drawn):
        q = p.copy()
        if drawn is not None:
            q[drawn] = 0.0
        return select_samples(q / q.sum(), n, seed=seed, method="two-stage", assignments=a)

    exact = {(i, j): p[i] * p[j] / (1 - p[i]) for i, j in itertools.permutations(range(4), 2)}
    counts = dict.fromkeys(exact, 0)
    n_draws = 4000
    for s in range(n_draws):
        counts[tuple(draw_with_reserve(draw, 1, 1, seed=s, method="two-stage").tolist())] += 1
    pairs = sorted(exact)
    observed = np.array([counts[q] for q in pairs])
    assert stats.chisquare(observed, np.array([exact[q] for q in pairs]) * n_draws).pvalue > GOF_ALPHA


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("reserve")
    return root, write_synthetic_index(root, n=3000, k=12)


@pytest.mark.parametrize("method", ["auto", "es-keys", "two-stage"])
def test_selection_with_fill_keeps_the_budget_rows_and_appends_the_reserve(synth, tmp_path, method):
    from nds.config import Workspace
    from nds.select.request import SelectRequest
    from nds.select.service import run_selection

    root, info = synth
    ws = Workspace(root)
    runs = {}
    for fill in (0.0, 0.2):
        request = SelectRequest(scores=synthetic_scores(info, favour=3), budget=101, seed=5, method=method, fill=fill,
                                exclude=["s000000007"])
        runs[fill] = (run_selection(ws, request, out_dir=tmp_path / f"f{fill}"), load_manifest(tmp_path / f"f{fill}"))
    (plain, rows0), (filled, rows2) = runs[0.0], runs[0.2]
    assert (plain["budget"], plain["reserve"], plain["rows"]) == (101, 0, 101)
    assert (filled["budget"], filled["reserve"], filled["rows"]) == (101, 21, 122)  # ceil(101 * 1.2)
    assert rows2.slice(0, 101).equals(rows0)
    assert rows2.column("rank").to_pylist() == list(range(122))
    assert len(set(rows2.column("sample_id").to_pylist()) | {"s000000007"}) == 123  # distinct, exclusion kept
    assert filled["parameters"]["fill"] == 0.2


def test_fill_that_overruns_the_eligible_samples_is_one_line(synth, tmp_path):
    from nds.config import Workspace
    from nds.select.request import SelectRequest
    from nds.select.service import run_selection

    root, info = synth
    request = SelectRequest(scores=synthetic_scores(info), budget=2900, fill=0.1)
    with pytest.raises(InvalidInputError, match=r"budget 2900 plus a reserve of 290 \(fill 0.1\) exceeds the 3000.*fill"):
        run_selection(Workspace(root), request, out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_select_fill(synth, tmp_path, capsys):
    import json

    from flows.cli import main

    root, info = synth
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(synthetic_scores(info)))
    assert main(["--root", str(root), "select", "--scores", str(scores), "--budget", "50", "--fill", "0.1",
                 "--out", str(tmp_path / "sel")]) == 0
    assert "55 of 3000 eligible samples (50 + 5 reserve rows, rank >= 50)" in capsys.readouterr().out
    assert load_manifest(tmp_path / "sel").num_rows == 55
