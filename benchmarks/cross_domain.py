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
processes (one thread each) with --tasks (none) and separate --out files; --tau-merge pools
the seeds of earlier files (work split across runs or machines): their gains, with scores made
again by the scorers as they are now. If the workspace's
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


def tau_table(ws, pool, name, scorers, seeds, shots, test_per_class, earlier=()) -> dict:
    """Per-cluster transfer gain vs each scorer's scores on one task: weighted Kendall tau.

    Per seed: the task's split, the pre-training and the fine-tuning all use that seed; each
    cluster alone is pre-trained with the default recipe (nds evaluate's, scaled to the
    cluster's size) and fine-tuned; gain = accuracy - accuracy of `none` of the same seed.
    ``earlier``: this task's entries of earlier runs (other seeds, same index) to pool with: their
    gains are kept, their scores made again (seconds) with ``scorers`` as they are now.
    """
    from nds.evaluate.training import TrainConfig, finetune_and_test, pretrain
    from nds.models.experts import torch_threads

    config = TrainConfig()
    members = _cluster_members(pool)
    runs = {int(seed): run for entry in earlier for seed, run in zip(entry["seeds"], _runs(entry))}
    for seed in seeds:
        task = build_target_task(ws, name, shots=shots, seed=seed, test_per_class=test_per_class)
        if seed in runs:  # the gains are kept; the scores are cheap and follow the scorers' current code
            print(f"tau {name} seed {seed}: gains kept from an earlier run, scores made again", flush=True)
            runs[seed]["scores"] = {m: score_task(ws, task, seed=seed, mode=m)["scores"] for m in scorers}
            continue
        t0 = time.perf_counter()
        with torch_threads(1):
            base = finetune_and_test(None, task.train_images, task.train_labels, task.test_images,
                                     task.test_labels, config=config, seed=seed)
            gains = []
            for k, pos in enumerate(members):
                model = pretrain(pool.images[pos], pool.labels[pos], config=config, seed=seed, progress=False)
                acc = finetune_and_test(model, task.train_images, task.train_labels, task.test_images,
                                        task.test_labels, config=config, seed=seed)
                gains.append(acc - base)
                print(f"tau {name} seed {seed}: cluster {k} ({len(pos)} images) gain {acc - base:+.3f} "
                      f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        runs[seed] = {"none": base, "gains": gains, "test_images": len(task.test_labels),
                      "scores": {m: score_task(ws, task, seed=seed, mode=m)["scores"] for m in scorers}}
    related_domains = build_target_task(ws, name, shots=shots, seed=0, test_per_class=1).related_domains
    return summarise_tau(name, shots, runs, pool, members, related_domains, scorers)


def summarise_tau(name, shots, runs: dict, pool, members, related_domains, scorers) -> dict:
    """The tau entry of one task from its per-seed runs: scorer tau per seed and against the mean
    gain, the seed-vs-seed tau of the gains (how reproducible the ranking to predict is: it bounds
    what any scorer can reach) and the mean gain of the related clusters vs the others."""
    from scipy.stats import weightedtau

    seeds = sorted(runs)
    gains = np.asarray([runs[s]["gains"] for s in seeds])
    mean_gain = gains.mean(axis=0)
    related = np.asarray([bool(np.isin(pool.datasets[pos], related_domains).mean() >= 0.5) for pos in members])
    pairs = [(a, b) for a in range(len(seeds)) for b in range(a + 1, len(seeds))]
    out = {"task": name, "seeds": seeds, "shots": shots, "test_images": runs[seeds[0]]["test_images"],
           "none": [runs[s]["none"] for s in seeds], "gains": gains.tolist(),
           "cluster_size": [len(p) for p in members],
           "cluster_domain": [_majority(pool.datasets[p]) for p in members], "related_cluster": related.tolist(),
           "related_gain": float(mean_gain[related].mean()) if related.any() else None,
           "unrelated_gain": float(mean_gain[~related].mean()) if not related.all() else None,
           "reliability": (float(np.mean([weightedtau(gains[a], gains[b]).statistic for a, b in pairs]))
                           if pairs else None),
           "scores": {m: [runs[s]["scores"][m] for s in seeds] for m in scorers}, "tau": {}, "tau_per_seed": {}}
    for mode in scorers:
        scores = np.asarray(out["scores"][mode])
        out["tau_per_seed"][mode] = [float(weightedtau(scores[i], gains[i]).statistic) for i in range(len(seeds))]
        out["tau"][mode] = float(weightedtau(scores.mean(axis=0), mean_gain).statistic)
    return out


def _runs(entry: dict) -> list[dict]:
    """The per-seed runs stored in one tau entry (summarise_tau's output)."""
    return [{"none": entry["none"][i], "gains": entry["gains"][i], "test_images": entry["test_images"],
             "scores": {m: v[i] for m, v in entry["scores"].items()}} for i in range(len(entry["seeds"]))]


def _earlier_taus(paths, index_version: str) -> list[dict]:
    """The tau entries of earlier result files; exits naming the file if it cannot be pooled."""
    entries = []
    for f in paths:
        doc = json.loads(Path(f).read_text())
        if doc.get("index_version") != index_version:
            raise SystemExit(f"--tau-merge {f}: measured on index {doc.get('index_version')}, not the current "
                             f"{index_version}; per-cluster gains pool only within one index")
        entries += doc["tau"]
    return entries


def _cluster_members(pool) -> list[np.ndarray]:
    assignments = pool.index.assignments
    return [np.flatnonzero(assignments == k) for k in range(int(assignments.max()) + 1)]


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
    ap.add_argument("--tau-seeds", type=int, nargs="+", default=[0, 1],
                    help="seeds of the per-cluster gains (two or more show how stable they are)")
    ap.add_argument("--tau-merge", nargs="*", default=[], metavar="JSON",
                    help="earlier result files whose tau entries (other seeds, same index) are pooled in")
    ap.add_argument("--tau-test", type=int, default=100, help="test images per class for --tau")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cross_domain.json"))
    args = ap.parse_args()

    ws = Workspace.from_env(args.root)
    ensure_cluster_stats(ws)
    pool = load_source_pool(ws)
    budget = resolve_budget(args.budget if args.budget < 1 else int(args.budget), pool.size)
    earlier = _earlier_taus(args.tau_merge, pool.index.version)
    rows = share_table(ws, pool, args.tasks, args.scorers, range(args.seeds), budget, args.shots)
    taus = [tau_table(ws, pool, t, args.scorers, args.tau_seeds, args.shots, args.tau_test,
                      earlier=[e for e in earlier if e["task"] == t]) for t in args.tau]
    result = {"index_version": pool.index.version, "budget": budget, "n_source": pool.size, "shots": args.shots,
              "seeds": args.seeds, "rows": rows, "tau": taus}
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
