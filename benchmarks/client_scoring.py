"""Client-side scoring: K experts on the client's images, on CPU (target: K=50, 1,000 images < 60 s).

    .venv/bin/python benchmarks/client_scoring.py                        # K = 50, 1,000 images, 1 and 2 threads
    .venv/bin/python benchmarks/client_scoring.py --k 3 --images 64 --modes rotation

Builds a synthetic bundle of K untrained-but-valid experts (nds.models.experts.build_expert /
save_expert, nds.formats.bundle.write_bundle) in a temp dir and times
nds.client.scoring.score_experts per mode, with the images decoded once (a ClientData built in
memory, as nds.client.images.load_client_images returns it). Baseline in the same run: a naive
per-expert loop of the bare forward passes the mode needs (each expert preprocesses and, for
"rotation", rotates the images itself, 256 images = 1,024 rotated inputs per pass: what the
scorer did before), without loading or probe fitting. ratio = baseline / ours (> 1: ours is
faster). Prints a markdown table and
writes benchmarks/results/client_scoring.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nds.client import scoring
from nds.client.images import ClientData
from nds.formats.bundle import load_bundle, write_bundle
from nds.index.cluster_stats import compute_cluster_stats
from nds.models import experts

RESULTS = Path(__file__).resolve().parent / "results" / "client_scoring.json"
TARGET_S = 60.0
ARCH = "rotnet_small"


def build_bundle(folder: Path, k: int) -> None:
    entries = []
    for i in range(k):
        torch.manual_seed(i)
        model = experts.build_expert(ARCH)
        name = f"expert_{i:03d}.pt"
        sha = experts.save_expert(model, folder / name, meta={"arch": ARCH, "expert": i})
        entries.append({"expert": i, "file": name, "sha256": sha, "n_images": 0})
    # The features scorer's reference sample: 64 rows per cluster, as an index writes it (random features:
    # the timing does not depend on their values).
    rows = compute_cluster_stats(np.random.default_rng(0).random((k * 64, 1280), dtype=np.float32),
                                 np.repeat(np.arange(k), 64), k=k, extractor="efficientnet_lite0", image_size=64)
    write_bundle(folder, index_version="bench", network=experts.bundle_fields(ARCH), experts=entries,
                 extra={"cluster_stats": rows.to_json()})


def client_data(n: int, classes: int) -> ClientData:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.array([f"class{i % classes}" for i in range(n)])
    return ClientData(images, labels, sorted(set(labels.tolist())), [f"mem#{i}" for i in range(n)])


def raw_forward(folder: Path, data: ClientData, mode: str) -> float:
    """Seconds of a naive per-expert loop of forward passes (no loading, no probes); for
    features the bare extractor forward, for combined both."""
    if mode == "combined":
        return raw_forward(folder, data, "rotation") + raw_forward(folder, data, "features")
    bundle = load_bundle(folder, verify=False)
    if mode == "features":
        from nds.models.extractors import load_extractor
        from nds.params import ExtractParams

        extractor = load_extractor(ExtractParams(image_size=64))
        t0 = time.perf_counter()
        for s in range(0, len(data.images), scoring.EXTRACT_BATCH):
            extractor(data.images[s : s + scoring.EXTRACT_BATCH])
        return time.perf_counter() - t0
    models = [experts.load_expert(folder / e["file"])[0] for e in bundle["experts"]]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for m in models:
            for s in range(0, len(data.images), scoring.BATCH_SIZE):
                x = experts.preprocess(data.images[s : s + scoring.BATCH_SIZE])
                if mode == "rotation":
                    xr, _ = experts.rotate_batch(x)
                    m(xr)
                else:
                    m.features(x)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--modes", nargs="+", default=["rotation", "linear", "features", "combined"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (each value is a row)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    data = client_data(args.images, args.classes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_bundle(folder, args.k)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for mode in args.modes:
                t0 = time.perf_counter()
                result = scoring.score_experts(folder, data, mode=mode, seed=0, progress=False, threads=threads)
                ours = time.perf_counter() - t0
                assert result.scores.shape == (args.k,) and np.isfinite(result.scores).all()
                base = raw_forward(folder, data, mode)
                rows.append({"mode": mode, "k": args.k, "images": args.images, "threads": threads,
                             "seconds": ours, "naive_forward_seconds": base, "speedup_vs_naive": base / ours,
                             "target_s": TARGET_S, "meets_target": ours < TARGET_S})
                print(f"<!-- {mode}, {threads} threads: {ours:.1f}s -->", flush=True)
    print(f"\nscore_experts, K={args.k} experts, {args.images} images (target < {TARGET_S:.0f} s)\n")
    print("| figure | ours: score_experts (s) | baseline: naive per-expert forwards (s) | baseline / ours |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} K={r['k']} n={r['images']} threads={r['threads']} | {r['seconds']:.1f} | {r['naive_forward_seconds']:.1f} | "
              f"{r['speedup_vs_naive']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "client_scoring", "python": platform.python_version(),
                                    "torch": torch.__version__, "machine": platform.machine(), "rows": rows},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
