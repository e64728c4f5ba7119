"""Does the selection pick the client's domain? Domain share of a 10% selection, per scorer and T.

For each domain of the indexed corpus, a client task is built from its HELD-OUT images
(never in the source), scored against the expert bundle with each scorer, and the server
draws 10% of the source. Reported: the share of selected samples from the client's domain,
next to that domain's share of the corpus (what uniform sampling would give).

    .venv/bin/python benchmarks/domain_precision.py            # the workspace in the cwd
    .venv/bin/python benchmarks/domain_precision.py --modes rotation --temperatures 0.02 0.05

Writes benchmarks/results/domain_precision.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from nds.client.images import load_client_images
from nds.client.scoring import score_experts
from nds.config import Workspace
from nds.corpus.holdout import export_holdout
from nds.select.probability import compute_expert_weights, compute_sample_probabilities, resolve_budget
from nds.select.samplers import select_samples
from nds.select.service import load_current_index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--modes", nargs="+", default=["linear", "rotation", "logme"])
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.01, 0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--max-classes", type=int, default=10)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/domain_precision.json")
    args = ap.parse_args()

    ws = Workspace.from_env(args.root)
    index = load_current_index(ws)
    datasets = np.asarray(index.catalog.column("dataset").to_pylist(), dtype=object)
    domains = sorted(set(datasets))
    bundle_dir = ws.stage_dir("experts")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dom in domains:
            client_dir = Path(tmp) / dom
            info = export_holdout(ws, dom, client_dir, per_class=args.per_class, max_classes=args.max_classes)
            data = load_client_images(client_dir, progress=False)
            for mode in args.modes:
                t0 = time.perf_counter()
                res = score_experts(bundle_dir, data, mode=mode, progress=False)
                score_s = time.perf_counter() - t0
                for T in args.temperatures:
                    w = compute_expert_weights(res.scores, temperature=T)
                    p = compute_sample_probabilities(index.assignments, w)
                    budget = resolve_budget(args.budget, len(p))
                    shares = []
                    for seed in range(args.seeds):
                        picked = select_samples(p, budget, seed=seed)
                        shares.append(float((datasets[picked] == dom).mean()))
                    rows.append({
                        "domain": dom, "mode": mode, "temperature": T, "client_images": info["images"],
                        "share_selected": round(float(np.mean(shares)), 4),
                        "share_corpus": round(float((datasets == dom).mean()), 4),
                        "scoring_seconds": round(score_s, 2),
                    })
                print(f"{dom:8s} {mode:8s} scored in {score_s:.1f}s: " + " ".join(
                    f"T={r['temperature']}:{r['share_selected']:.2f}" for r in rows[-len(args.temperatures):]), flush=True)

    print("\n| domain | corpus share | " + " | ".join(f"{m} T={t}" for m in args.modes for t in args.temperatures) + " |")
    print("|---|---|" + "---|" * (len(args.modes) * len(args.temperatures)))
    for dom in domains:
        cells = [next(r for r in rows if r["domain"] == dom and r["mode"] == m and r["temperature"] == t)["share_selected"]
                 for m in args.modes for t in args.temperatures]
        base = next(r for r in rows if r["domain"] == dom)["share_corpus"]
        print(f"| {dom} | {base:.3f} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    means = {f"{m} T={t}": round(float(np.mean([r["share_selected"] for r in rows if r["mode"] == m and r["temperature"] == t])), 4)
             for m in args.modes for t in args.temperatures}
    print("| **mean** | | " + " | ".join(f"{v:.3f}" for v in means.values()) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"index_version": index.version, "k": index.k, "budget": args.budget,
                               "seeds": args.seeds, "rows": rows, "mean_share": means}, indent=2))


if __name__ == "__main__":
    main()
