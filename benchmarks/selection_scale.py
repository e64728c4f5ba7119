"""The budgeted draw at corpus scale: the clustered fast path against es-keys and numpy choice.

    .venv/bin/python benchmarks/selection_scale.py                       # N = 1e6, 1e7, 1e8
    .venv/bin/python benchmarks/selection_scale.py --sizes 1e6 --clusters 100

The weight table (expert int32 + weight float64 per sample) and the cluster layout
(nds.index.layout.build_cluster_layout) are written once per (N, K) as .npy files and
memory-mapped, as the selection flow would read them. Every timed draw runs in a fresh
subprocess, so its peak RSS (resource.getrusage) is its own. Baselines in the same run:
es-keys with argpartition (select_samples(method="es-keys") on the (N,) probabilities) and
numpy `Generator.choice(N, B, replace=False, p=p)` up to --baseline-max-n. A small exactness
check (ordered pairs vs the exact successive-sampling law; per-cluster counts vs es-keys)
runs first. Prints a markdown table and writes benchmarks/results/selection_scale.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "selection_scale.json"
CHUNK = 2**22  # synthetic tables are generated in chunks so setup memory stays flat in N
SEED = 1


def _rss_mb() -> float:
    """Peak resident set of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(n: int, k: int, folder: Path) -> dict:
    """Write the weight table and the cluster layout for (n, k); returns sizes and timings."""
    from nds.index.layout import build_cluster_layout, save_cluster_layout

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # Cluster sizes vary like k-means clusters do (lognormal shares), not all equal.
    share = rng.lognormal(0.0, 0.5, k)
    cum = np.cumsum(share / share.sum())
    a = np.lib.format.open_memmap(folder / "expert.npy", mode="w+", dtype=np.int32, shape=(n,))
    for lo in range(0, n, CHUNK):
        u = rng.random(min(CHUNK, n - lo))
        a[lo : lo + u.size] = np.minimum(np.searchsorted(cum, u, side="right"), k - 1)
    a.flush()
    t0 = time.perf_counter()
    layout = build_cluster_layout(a, k)
    layout_s = time.perf_counter() - t0
    save_cluster_layout(layout, folder)
    sizes = np.diff(layout[1])
    weight = np.lib.format.open_memmap(folder / "weight.npy", mode="w+", dtype=np.float64, shape=(n,))
    inv = np.where(sizes > 0, 1.0 / np.maximum(sizes, 1), 0.0)
    for lo in range(0, n, CHUNK):
        weight[lo : lo + CHUNK] = inv[a[lo : lo + CHUNK]]
    weight.flush()
    table_bytes = (folder / "expert.npy").stat().st_size + (folder / "weight.npy").stat().st_size
    return {"layout_s": layout_s, "table_mb": table_bytes / 2**20, "layout_peak_rss_mb": _rss_mb()}


def _measure(method: str, n: int, k: int, budget: int, folder: Path, repeats: int) -> dict:
    """One configuration, in its own process: best-of draw time and peak RSS."""
    from nds.index.layout import load_cluster_layout
    from nds.select.probability import compute_expert_weights, compute_sample_probabilities
    from nds.select.samplers import select_samples
    from nds.select.samplers.clustered import select_samples_clustered

    w = compute_expert_weights(np.random.default_rng(2).normal(size=k), temperature=0.5)
    rss_before = _rss_mb()
    best, prep = float("inf"), 0.0
    if method == "clustered":
        t0 = time.perf_counter()
        layout = load_cluster_layout(folder)
        prep = time.perf_counter() - t0
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = select_samples_clustered(layout, w, budget, seed=SEED)
            best = min(best, time.perf_counter() - t0)
    else:
        t0 = time.perf_counter()
        a = np.load(folder / "expert.npy", mmap_mode="r")
        p = compute_sample_probabilities(a, w)
        prep = time.perf_counter() - t0
        for _ in range(repeats):
            t0 = time.perf_counter()
            if method == "es-keys":
                out = select_samples(p, budget, seed=SEED, method="es-keys")
            else:
                out = np.random.default_rng(SEED).choice(n, budget, replace=False, p=p)
            best = min(best, time.perf_counter() - t0)
    assert np.unique(out).size == budget
    return {"draw_s": best, "prep_s": prep, "peak_rss_mb": _rss_mb(), "rss_before_mb": rss_before}


def _child(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _exactness(seeds: int) -> dict:
    """Small-case law checks: p-values (a pass is > 1e-3)."""
    from scipy import stats

    from nds.index.layout import build_cluster_layout
    from nds.select.probability import compute_expert_weights, compute_sample_probabilities
    from nds.select.samplers import select_samples
    from nds.select.samplers.clustered import select_samples_clustered

    a = np.array([0, 0, 1, 1, 1, 2])
    w = np.array([0.5, 0.3, 0.2])
    p = compute_sample_probabilities(a, w)
    exact = {(i, j): p[i] * p[j] / (1 - p[i]) for i, j in itertools.permutations(range(6), 2)}
    layout = build_cluster_layout(a, 3)
    counts = dict.fromkeys(exact, 0)
    for s in range(seeds):
        counts[tuple(select_samples_clustered(layout, w, 2, seed=s).tolist())] += 1
    pairs = sorted(exact)
    pairs_p = stats.chisquare([counts[q] for q in pairs], np.array([exact[q] for q in pairs]) * seeds).pvalue

    rng = np.random.default_rng(5)
    k = 12
    a = rng.integers(0, k, 2000)
    w = compute_expert_weights(rng.normal(size=k), temperature=0.5)
    p = compute_sample_probabilities(a, w)
    layout = build_cluster_layout(a, k)
    top = int(np.argmax(w))
    runs = max(50, seeds // 10)
    es = [np.count_nonzero(a[select_samples(p, 100, seed=s)] == top) for s in range(runs)]
    cl = [np.count_nonzero(a[select_samples_clustered(layout, w, 100, seed=s)] == top) for s in range(runs)]
    return {"ordered_pairs_chi2_p": float(pairs_p), "top_cluster_count_ks_p": float(stats.ks_2samp(es, cl).pvalue),
            "seeds": seeds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8], help="corpus sizes N")
    parser.add_argument("--clusters", nargs="+", type=int, default=[100, 1000], help="K values")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1], help="budget as a fraction of N")
    parser.add_argument("--repeats", type=int, default=7, help="best-of repeats inside each measuring process")
    parser.add_argument("--baseline-max-n", type=float, default=1e7, help="largest N for numpy choice")
    parser.add_argument("--es-keys-max-n", type=float, default=1e8, help="largest N for the es-keys baseline")
    parser.add_argument("--exactness-seeds", type=int, default=4000)
    parser.add_argument("--workdir", type=Path, default=None, help="where the tables go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = json.loads(args.child)
        result = _setup(int(rest[0]), int(rest[1]), Path(rest[2])) if kind == "setup" else _measure(
            kind, int(rest[0]), int(rest[1]), int(rest[2]), Path(rest[3]), int(rest[4]))
        print(json.dumps(result))
        return

    exact = _exactness(args.exactness_seeds)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n, k in itertools.product((int(s) for s in args.sizes), args.clusters):
            folder = Path(tmp) / f"n{n}_k{k}"
            setup = _child(["setup", n, k, str(folder)])
            for fraction in args.fractions:
                budget = max(1, round(fraction * n))
                row = {"n": n, "k": k, "budget": budget, "fraction": fraction, "table_mb": setup["table_mb"],
                       "layout_s": setup["layout_s"], "layout_peak_rss_mb": setup["layout_peak_rss_mb"]}
                methods = ["clustered"]
                if n <= args.es_keys_max_n:
                    methods.append("es-keys")
                if n <= args.baseline_max_n:
                    methods.append("numpy-choice")
                for method in methods:
                    reps = args.repeats if method == "clustered" else 1
                    row[method] = _child([method, n, k, budget, str(folder), reps])
                for base in ("es-keys", "numpy-choice"):
                    if base in row:
                        row[f"ratio_vs_{base}"] = row[base]["draw_s"] / row["clustered"]["draw_s"]
                # Memory the draw adds over the bare interpreter with numpy and nds loaded.
                row["clustered_peak_over_table"] = (
                    row["clustered"]["peak_rss_mb"] - row["clustered"]["rss_before_mb"]) / row["table_mb"]
                rows.append(row)
                print(_row(row), flush=True)
            for f in folder.iterdir():
                f.unlink()

    print()
    print(f"exactness (small case, p-values; pass > 1e-3): ordered pairs chi-square "
          f"{exact['ordered_pairs_chi2_p']:.3f}, top-cluster count KS vs es-keys {exact['top_cluster_count_ks_p']:.3f}")
    print()
    print("| figure | ours: clustered (s) | baseline (s) | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        for line in _table_lines(r):
            print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "selection_scale",
        "ours": "nds.select.samplers.clustered.select_samples_clustered on a memory-mapped cluster layout",
        "baselines": ["select_samples(method='es-keys') on (N,) probabilities",
                      "numpy.random.Generator.choice(N, B, replace=False, p=p)"],
        "python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
        "exactness": exact, "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


def _row(r: dict) -> str:
    return f"<!-- N={r['n']:.0e} K={r['k']} B={r['fraction']:.0%} done: clustered {r['clustered']['draw_s']:.3f}s -->"


def _table_lines(r: dict) -> list[str]:
    fig = f"N={r['n']:.0e} K={r['k']} B={r['fraction']:.0%}"
    ours = r["clustered"]
    lines = []
    for base in ("numpy-choice", "es-keys"):
        if base in r:
            lines.append(f"| {fig} draw vs {base} | {ours['draw_s']:.3f} | {r[base]['draw_s']:.3f} | "
                         f"{r[f'ratio_vs_{base}']:.1f}x |")
    def added(m: dict) -> float:
        return m["peak_rss_mb"] - m["rss_before_mb"]

    mem_base = f"{added(r['es-keys']):.0f}" if "es-keys" in r else "-"
    lines.append(f"| {fig} peak RSS added, MiB (table {r['table_mb']:.0f} MiB) | {added(ours):.0f} | "
                 f"{mem_base} (es-keys) | {r['clustered_peak_over_table']:.2f}x table |")
    return lines


if __name__ == "__main__":
    main()
