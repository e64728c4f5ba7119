"""Time the selection draw: our samplers against numpy's Generator.choice(replace=False, p=...).

    python benchmarks/selection_draw.py --sizes 1e6 1e7
    python benchmarks/selection_draw.py --sizes 1e7 --skip-baseline

Prints a markdown table (figure, ours, baseline, ratio) and writes
benchmarks/results/selection_draw.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from nds.select.probability import compute_expert_weights, compute_sample_probabilities
from nds.select.samplers import probability_samplers, select_samples

RESULTS = Path(__file__).resolve().parent / "results" / "selection_draw.json"
# numpy's choice(replace=False, p=...) took 11.8 s for 1% of 1e7; beyond that it is hours.
BASELINE_MAX_N = 10**7
BASELINE_FRACTIONS = (0.01,)


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7], help="corpus sizes N")
    parser.add_argument("--clusters", nargs="+", type=int, default=[100, 1000], help="K values")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1], help="budget as a fraction of N")
    parser.add_argument("--repeats", type=int, default=3, help="best-of repeats for our samplers")
    parser.add_argument("--skip-baseline", action="store_true", help="do not time numpy choice (slow)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = []
    for n in (int(s) for s in args.sizes):
        for k in args.clusters:
            rng = np.random.default_rng(0)
            assignments = rng.integers(0, k, n)
            weights = compute_expert_weights(rng.normal(size=k), temperature=0.5)
            p = compute_sample_probabilities(assignments, weights)
            for fraction in args.fractions:
                budget = max(1, round(fraction * n))
                baseline = None
                if not args.skip_baseline and n <= BASELINE_MAX_N and fraction in BASELINE_FRACTIONS:
                    baseline = _best_of(
                        lambda: np.random.default_rng(1).choice(n, budget, replace=False, p=p), 1
                    )
                for method in probability_samplers():
                    ours = _best_of(
                        lambda: select_samples(p, budget, seed=1, method=method, assignments=assignments),
                        args.repeats,
                    )
                    rows.append({
                        "figure": f"N={n:.0e} K={k} B={fraction:.0%} {method}",
                        "n": n, "k": k, "budget": budget, "method": method,
                        "ours_s": ours, "baseline_s": baseline,
                        "ratio": None if baseline is None else baseline / ours,
                    })

    print("| figure | ours (s) | baseline numpy choice (s) | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print(_row(r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "selection_draw",
        "baseline": "numpy.random.Generator.choice(N, B, replace=False, p=p)",
        "python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
        "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


def _row(r: dict) -> str:
    base = "skipped" if r["baseline_s"] is None else f"{r['baseline_s']:.3f}"
    ratio = "" if r["ratio"] is None else f"{r['ratio']:.1f}x"
    return f"| {r['figure']} | {r['ours_s']:.3f} | {base} | {ratio} |"


if __name__ == "__main__":
    main()
