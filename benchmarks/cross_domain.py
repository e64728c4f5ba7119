"""Clients from outside the source: related-domain share per scorer, transfer, and scorer tau.

For each cross-domain task (nds.corpus.tasks: digits-m, lcd-digits, icons, nebulae; add the
in-domain ones with --tasks) and seed, the task's few-shot TRAIN images are scored with each
scorer, the server draws the budget (nds.select.service.run_selection, the real path), and
the share of the selection from the task's related source domain(s) is reported beside
uniform's share of the same budget.

    .venv/bin/python benchmarks/cross_domain.py --root WS                       # share table
    .venv/bin/python benchmarks/cross_domain.py --root WS --tasks --tau icons --out icons_tau.json

--tau TASK also measures scorer quality: per seed, each cluster alone pre-trains the small CNN
(nds evaluate's recipe), which is fine-tuned on the task; gain_k = accuracy - accuracy of
`none`. Reported: weighted Kendall tau (scipy.stats.weightedtau, the transferability
literature's metric) between every scorer's per-expert scores and the gains, the same tau
between two seeds' gains (how stable the ranking to be predicted is), and the mean gain of
the task's related clusters vs the others. K pre-trainings per seed: run tasks as parallel
processes (one thread each) with --tasks (none) and separate --out files. If the workspace's
bundle has no cluster_stats of this format yet, they are written in place (what the
train_experts stage writes).

Writes benchmarks/results/cross_domain.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from nds.config import Workspace
from nds.evaluate.strategies import domain_precision, load_source_pool, score_task, select_for_strategy
from nds.evaluate.tasks import build_target_task
from nds.formats.bundle import BUNDLE_FILE, write_bundle
from nds.index.cluster_stats import STATS_FORMAT, bundle_cluster_stats
from nds.select.probability import resolve_budget

CROSS_TASKS = ["digits-m", "lcd-digits", "icons", "nebulae"]
SCORERS = ["rotation", "linear", "logme", "features"]
#: bundle.json keys write_bundle sets itself; the rest travel as extra.
_OWN_KEYS = ("format", "index_version", "k", "architecture", "input_size", "feature_dim", "preprocessing",
             "experts", "bundle_sha256")


def ensure_cluster_stats(ws: Workspace) -> None:
    """(Re)write the workspace bundle's cluster_stats if the stage that made it predates this format."""
    folder = ws.stage_dir("experts")
    bundle = json.loads((folder / BUNDLE_FILE).read_text())
    if bundle.get("cluster_stats", {}).get("format") == STATS_FORMAT:
        return
    extra = {k: v for k, v in bundle.items() if k not in _OWN_KEYS}
    extra["cluster_stats"] = bundle_cluster_stats(ws)
    write_bundle(folder, index_version=bundle["index_version"], experts=bundle["experts"], extra=extra,
                 network={k: bundle[k] for k in ("architecture", "input_size", "feature_dim", "preprocessing")})


def share_table(ws, pool, tasks, scorers, seeds, budget, shots) -> list[dict]:
    rows = []
    for name in tasks:
        for seed in seeds:
            task = build_target_task(ws, name, shots=shots, seed=seed, test_per_class=1)
            uni = select_for_strategy(ws, pool, "uniform", budget, seed=seed)
            row = {"task": name, "related": "+".join(task.related_domains) or "-", "seed": seed,
                   "uniform": domain_precision(pool, uni, task.related_domains)}
            for mode in scorers:
                t0 = time.perf_counter()
                scores = score_task(ws, task, seed=seed, mode=mode)
                pos = select_for_strategy(ws, pool, "nds", budget, seed=seed, scores=scores)
                row[mode] = domain_precision(pool, pos, task.related_domains)
                names, counts = np.unique(pool.datasets[pos], return_counts=True)
                row[f"{mode}_top"] = names[np.argsort(-counts)][:2].tolist()  # the two biggest domains
                row[f"{mode}_seconds"] = round(time.perf_counter() - t0, 2)
                row[f"{mode}_scores"] = scores["scores"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_scores")}), flush=True)
    return rows


def tau_table(ws, pool, name, scorers, seeds, shots, test_per_class) -> dict:
    """Per-cluster transfer gain vs each scorer's scores on one task: weighted Kendall tau.

    Per seed: the task's split, the pre-training and the fine-tuning all use that seed; each
    cluster alone is pre-trained with the default recipe (nds evaluate's, scaled to the
    cluster's size) and fine-tuned; gain = accuracy - accuracy of `none` of the same seed.
    The gains of two seeds ranked against each other (`reliability`) bound what any scorer
    can reach; scorer tau is reported per seed and against the mean gain over seeds.
    """
    from scipy.stats import weightedtau

    from nds.evaluate.training import TrainConfig, finetune_and_test, pretrain
    from nds.models.experts import torch_threads

    config = TrainConfig()
    assignments = pool.index.assignments
    k_total = int(assignments.max()) + 1
    members = [np.flatnonzero(assignments == k) for k in range(k_total)]
    gains, nones, scores = [], [], {m: [] for m in scorers}
    task = None
    for seed in seeds:
        task = build_target_task(ws, name, shots=shots, seed=seed, test_per_class=test_per_class)
        t0 = time.perf_counter()
        with torch_threads(1):
            base = finetune_and_test(None, task.train_images, task.train_labels, task.test_images,
                                     task.test_labels, config=config, seed=seed)
            row = []
            for k, pos in enumerate(members):
                model = pretrain(pool.images[pos], pool.labels[pos], config=config, seed=seed, progress=False)
                acc = finetune_and_test(model, task.train_images, task.train_labels, task.test_images,
                                        task.test_labels, config=config, seed=seed)
                row.append(acc - base)
                print(f"tau {name} seed {seed}: cluster {k} ({len(pos)} images) gain {acc - base:+.3f} "
                      f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        gains.append(row)
        nones.append(base)
        for mode in scorers:
            scores[mode].append(score_task(ws, task, seed=seed, mode=mode)["scores"])
    gains_arr = np.asarray(gains)
    mean_gain = gains_arr.mean(axis=0)
    related = [bool(np.isin(pool.datasets[pos], task.related_domains).mean() >= 0.5) for pos in members]
    out = {"task": name, "seeds": list(seeds), "shots": shots, "test_images": len(task.test_labels),
           "none": nones, "gains": gains, "cluster_size": [len(p) for p in members],
           "cluster_domain": [_majority(pool.datasets[p]) for p in members], "related_cluster": related,
           "related_gain": float(mean_gain[related].mean()) if any(related) else None,
           "unrelated_gain": float(mean_gain[~np.asarray(related)].mean()) if not all(related) else None,
           "reliability": (float(np.mean([weightedtau(gains_arr[a], gains_arr[b]).statistic
                                          for a in range(len(seeds)) for b in range(a + 1, len(seeds))]))
                           if len(seeds) > 1 else None),
           "scores": scores, "tau": {}, "tau_per_seed": {}}
    for mode in scorers:
        per_seed = [float(weightedtau(scores[mode][i], gains_arr[i]).statistic) for i in range(len(seeds))]
        out["tau_per_seed"][mode] = per_seed
        out["tau"][mode] = float(weightedtau(np.mean(scores[mode], axis=0), mean_gain).statistic)
    return out


def _majority(datasets: np.ndarray) -> str:
    names, counts = np.unique(datasets, return_counts=True)
    return f"{names[np.argmax(counts)]} {counts.max() / counts.sum():.0%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--tasks", nargs="*", default=CROSS_TASKS, help="share table tasks (none: skip it)")
    ap.add_argument("--scorers", nargs="+", default=SCORERS)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--tau", nargs="*", default=[], help="tasks to measure per-cluster transfer gains on")
    ap.add_argument("--tau-seeds", type=int, default=2, help="seeds of the per-cluster gains (>= 2 shows their stability)")
    ap.add_argument("--tau-test", type=int, default=100, help="test images per class for --tau")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cross_domain.json"))
    args = ap.parse_args()

    ws = Workspace.from_env(args.root)
    ensure_cluster_stats(ws)
    pool = load_source_pool(ws)
    budget = resolve_budget(args.budget if args.budget < 1 else int(args.budget), pool.size)
    rows = share_table(ws, pool, args.tasks, args.scorers, range(args.seeds), budget, args.shots)
    taus = [tau_table(ws, pool, t, args.scorers, range(args.tau_seeds), args.shots, args.tau_test) for t in args.tau]
    result = {"budget": budget, "n_source": pool.size, "shots": args.shots, "seeds": args.seeds, "rows": rows,
              "tau": taus}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if rows:
        print(f"\nrelated-domain share of a {budget}-image selection ({args.budget:g} of {pool.size}), "
              f"mean of {args.seeds} seed(s), {args.shots} shots/class")
        print("| task | related | uniform | " + " | ".join(args.scorers) + " |")
        print("|---|---|---|" + "---|" * len(args.scorers))
    for name in args.tasks:
        rs = [r for r in rows if r["task"] == name]
        cell = lambda key: "-" if rs[0][key] is None else f"{np.mean([r[key] for r in rs]):.2f}"  # noqa: E731
        print(f"| {name} | {rs[0]['related']} | {cell('uniform')} | " + " | ".join(cell(m) for m in args.scorers) + " |")
    for t in taus:
        print(f"\nweighted Kendall tau, {t['task']} ({len(t['seeds'])} seeds, {t['test_images']} test images; "
              f"gain ranking seed vs seed {_fmt(t['reliability'])}; mean gain of related clusters "
              f"{_fmt(t['related_gain'])}, of the others {_fmt(t['unrelated_gain'])}): "
              + ", ".join(f"{m} {v:+.2f}" for m, v in t["tau"].items()))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:+.3f}"


if __name__ == "__main__":
    main()
