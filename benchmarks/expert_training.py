"""Expert training throughput on this machine: images/s (x4 rotations) per architecture.

    .venv/bin/python benchmarks/expert_training.py [--steps 20] [--threads 1 2]

Baseline in the same run: the same network with stride-1 convolutions and max-pooling (the
textbook RotNet layout), so the ratio says what the strided design buys. Writes
benchmarks/results/expert_training.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from nds.models import experts
def pooled_baseline() -> nn.Module:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return nn.Sequential(block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 4))


def throughput(model: nn.Module, *, steps: int, batch: int, device: str) -> float:
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = experts.preprocess(np.random.default_rng(0).integers(0, 255, (batch, 32, 32, 3), dtype=np.uint8))
    x, y = experts.rotate_batch(x)
    x, y = x.to(device), y.to(device)
    for i in range(steps + 3):
        if i == 3:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/expert_training.json")
    args = ap.parse_args()
    rows = []
    for threads in args.threads if args.device == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        base = throughput(pooled_baseline(), steps=args.steps, batch=args.batch, device=args.device)
        ours = throughput(experts.build_expert("rotnet_small"), steps=args.steps, batch=args.batch, device=args.device)
        rows.append({"device": args.device, "threads": threads, "ours_img_per_s": round(ours, 1),
                     "baseline_img_per_s": round(base, 1), "ratio": round(ours / base, 2)})
    print("| figure | ours | baseline (pooled RotNet) | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| training img/s, {r['device']}, {r['threads']} thread(s) | {r['ours_img_per_s']} | "
              f"{r['baseline_img_per_s']} | {r['ratio']}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"batch": args.batch, "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
