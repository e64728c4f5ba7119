"""Transfer evaluation on the workspace's index: nds vs uniform vs all vs none.

The run reported in benchmarks/results/transfer_eval/ (small index 3c6bcc5b: dataset-kmeans
clusters, K = 24; 2-core CPU, 3 seeds; the default recipe of ``nds.evaluate.training.TrainConfig``:
pre-training 30 epochs clamped to 300..3,600 steps, fine-tuning 300 steps at lr 1e-2). Only
nds depends on the index, so nds was run on this index in two lanes of one process at a time
(about 42 min wall), and the uniform, all and none rows are those of the previous run (index
c18421e0, same corpus and recipe; results.parquet filtered to those strategies, in /tmp/bench/old):

    B="--root . --budgets 0.02 0.05 0.1 0.2 --holdout-budget 0.1"
    T="digits clothing letters animals emoji"
    # lane A
    .venv/bin/python benchmarks/transfer_eval.py $B --tasks $T --strategies nds --seed-list 0 --out /tmp/bench/a0
    .venv/bin/python benchmarks/transfer_eval.py $B --tasks digits clothing letters --strategies nds --seed-list 2 --out /tmp/bench/a2
    # lane B, beside it
    .venv/bin/python benchmarks/transfer_eval.py $B --tasks $T --strategies nds --seed-list 1 --out /tmp/bench/b1
    .venv/bin/python benchmarks/transfer_eval.py $B --tasks animals emoji --strategies nds --seed-list 2 --out /tmp/bench/b2
    # merge
    .venv/bin/python benchmarks/transfer_eval.py --merge /tmp/bench/old /tmp/bench/a0 /tmp/bench/a2 /tmp/bench/b1 \
        /tmp/bench/b2 --holdout-budget 0.1

One process, everything from scratch: ``$B --tasks $T --seeds 3`` (about 2.5 h on 2 cores).
The old recipe is ``--pretrain-epochs 0 --pretrain-steps 150 --finetune-steps 80 --finetune-lr 0.001``.

Writes results.parquet, summary.{parquet,csv,md}, fits.json, accuracy_vs_budget.png and
benchmark.json (timings, and the log-linear fit made WITHOUT --holdout-budget against the
accuracy measured there) under --out. Library calls only (no Prefect server, no warehouse rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from nds._registry import EVAL_STRATEGIES
from nds.config import Workspace
from nds.evaluate.fit import fit_log_linear
from nds.evaluate.outputs import write_outputs
from nds.evaluate.runner import evaluate, resolve_budgets
from nds.evaluate.strategies import BUDGETED
from nds.evaluate.training import TrainConfig, pretrain_schedule


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=".")
    p.add_argument("--tasks", nargs="+", default=["digits", "clothing", "letters"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.02, 0.05, 0.1, 0.2])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--seed-list", type=int, nargs="+", help="explicit seeds instead (to split a run, see --merge)")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--strategies", nargs="+", default=EVAL_STRATEGIES.names(),
                   help="a subset, to split a run (e.g. uniform/none do not depend on the index; see --merge)")
    defaults = TrainConfig()
    p.add_argument("--pretrain-epochs", type=float, default=defaults.pretrain_epochs,
                   help="passes over the selection (clamped to the step floor/cap); 0: fixed --pretrain-steps")
    p.add_argument("--pretrain-min-steps", type=int, default=defaults.pretrain_min_steps)
    p.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps, help="cap of pre-training steps")
    p.add_argument("--finetune-steps", type=int, default=defaults.finetune_steps)
    p.add_argument("--finetune-lr", type=float, default=defaults.finetune_lr)
    p.add_argument("--finetune-mode", default=defaults.finetune_mode, choices=["all", "last"])
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--holdout-budget", type=float, default=None, help="leave this budget out of the fit check")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="no training: combine the results.parquet of runs split by --seed-list into --out")
    p.add_argument("--out", default="benchmarks/results/transfer_eval")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    config = TrainConfig(pretrain_epochs=args.pretrain_epochs or None,
                         pretrain_min_steps=args.pretrain_min_steps, pretrain_steps=args.pretrain_steps,
                         finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                         finetune_mode=args.finetune_mode)
    parts = []
    if args.merge:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables, seconds = [], 0.0
        for d in args.merge:
            tables.append(pq.read_table(Path(d, "results.parquet")))
            part = json.loads(Path(d, "benchmark.json").read_text())
            parts.append({"dir": d, "command": part["command"], "seconds": part["seconds"]})
            seconds = max(seconds, part["seconds"])  # the parts ran side by side
            config = TrainConfig(**part["config"])
        results = pa.concat_tables(tables).sort_by([("task", "ascending"), ("seed", "ascending")])
        args.tasks = list(dict.fromkeys(results.column("task").to_pylist()))
    else:
        ws = Workspace.from_env(args.root)
        seeds = args.seed_list if args.seed_list else list(range(args.seeds))
        t0 = time.perf_counter()
        results = evaluate(ws, args.tasks, args.budgets, strategies=args.strategies, seeds=seeds, shots=args.shots,
                           config=config, temperature=args.temperature, progress=True)
        seconds = time.perf_counter() - t0
    rows = results.to_pylist()
    n_source = next(r["budget"] for r in rows if r["strategy"] == "all") if any(r["strategy"] == "all" for r in rows) else None
    check = {}
    if args.holdout_budget is not None and n_source:
        held = resolve_budgets([args.holdout_budget], n_source)[0]
        for task in args.tasks:
            for strategy in BUDGETED:
                pts = [r for r in rows if r["task"] == task and r["strategy"] == strategy]
                fit_pts = [r for r in pts if r["budget"] != held]
                test_pts = [r["accuracy"] for r in pts if r["budget"] == held]
                if len({r["budget"] for r in fit_pts}) < 2 or not test_pts:
                    continue
                fit = fit_log_linear([r["budget"] for r in fit_pts], [r["accuracy"] for r in fit_pts])
                pred = fit.predict(held)
                se = math.sqrt(fit.se_a**2 + math.log(held) ** 2 * fit.se_b**2 + 2 * math.log(held) * fit.cov_ab)
                check[f"{task}/{strategy}"] = {"budget": held, "predicted": round(pred, 4), "se": round(se, 4),
                                               "measured": round(sum(test_pts) / len(test_pts), 4)}
    steps = {b: pretrain_schedule(b, config) for b in sorted({r["n_pretrain"] for r in rows if r["n_pretrain"]})}
    meta = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "seconds": round(seconds, 1),
            "config": config.model_dump(), "pretrain_steps_by_size": steps, "n_source": n_source,
            "holdout_check": check, **({"parts": parts} if parts else {})}
    out = write_outputs(results, Path(args.out), meta=meta)
    Path(args.out, "benchmark.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(out["markdown"])
    for k, v in check.items():
        print(f"held-out budget {v['budget']} {k}: fit predicts {v['predicted']:.3f} ± {v['se']:.3f}, measured {v['measured']:.3f}")
    print(f"{len(rows)} runs in {seconds:.0f}s -> {args.out} (plot {out['paths']['plot']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
