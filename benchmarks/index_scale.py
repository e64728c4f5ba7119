"""Index build at scale: streaming feature extraction and weight computation, time and peak RSS.

    .venv/bin/python benchmarks/index_scale.py                      # stand-in 1e5, 1e6; real model 1e4
    .venv/bin/python benchmarks/index_scale.py --stream-sizes 2e3 1e4 --real-n 256 --weight-sizes 1e5

Three figures, each configuration in a fresh subprocess so its peak RSS is its own:
1. nds.models.extractors.compute_features over a generator of synthetic uint8 (batch, 32, 32, 3)
   batches with a cheap stand-in extractor (two strided convolutions), at --stream-sizes:
   peak RSS must stay flat in N apart from the (N, dim) float16 output (memory-mapped).
   Baseline: the same process at the smallest N.
2. The real EfficientNet-Lite0 (load_extractor(ExtractParams(image_size=64))) at --real-n:
   full compute_features throughput vs the raw model forward on ready tensors in the same
   process (target: pipeline within 1.5x of raw forward).
3. nds.index.weights.compute_weights on synthetic assignments at --weight-sizes, against the
   minimal numpy expression (1 / bincount(a))[a].
Prints a markdown table and writes benchmarks/results/index_scale.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "index_scale.json"
BATCH = 256
POOL = 8  # distinct synthetic batches, cycled: the generator itself holds O(batch) memory


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batches(n: int, batch: int):
    pool = np.random.default_rng(0).integers(0, 256, (POOL, batch, 32, 32, 3), dtype=np.uint8)
    for i, lo in enumerate(range(0, n, batch)):
        yield pool[i % POOL][: min(batch, n - lo)]


def _stand_in():
    import torch.nn as nn

    from nds.models.extractors import Extractor

    net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    return Extractor("stand-in", 64, 32, net)


def _stream(n: int, folder: Path) -> dict:
    """compute_features with the stand-in extractor: throughput and peak RSS."""
    import torch  # noqa: F401  (import before the baseline RSS reading)

    from nds.models.extractors import compute_features

    extractor = _stand_in()
    extractor(np.zeros((2, 32, 32, 3), np.uint8))
    before = _rss_mb()
    stats = compute_features(_batches(n, BATCH), n, folder / "features.npy", extractor=extractor)
    out_mb = n * extractor.dim * 2 / 2**20
    (folder / "features.npy").unlink()
    return {"n": n, "seconds": stats["seconds"], "images_per_second": stats["images_per_second"],
            "peak_rss_mb": _rss_mb(), "rss_before_mb": before, "output_mb": out_mb}


def _real(n: int, folder: Path, batch: int) -> dict:
    """EfficientNet-Lite0 at 64 px: raw forward vs the full compute_features pipeline."""
    import torch

    from nds.models.extractors import _to_tensor, compute_features, load_extractor
    from nds.params import ExtractParams

    extractor = load_extractor(ExtractParams(image_size=64))
    images = next(_batches(batch, batch))
    x = _to_tensor(images, extractor.image_size)
    with torch.inference_mode():
        extractor.model(x)  # warm-up
        n_batches = max(1, n // batch)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            extractor.model(x)
        raw_s = time.perf_counter() - t0
    raw_ips = n_batches * batch / raw_s
    stats = compute_features(_batches(n, batch), n, folder / "features.npy", extractor=extractor)
    (folder / "features.npy").unlink()
    return {"n": n, "raw_images_per_second": raw_ips, "pipeline_images_per_second": stats["images_per_second"],
            "pipeline_model_seconds": stats["model_seconds"], "pipeline_seconds": stats["seconds"],
            "threads": torch.get_num_threads(), "peak_rss_mb": _rss_mb()}


def _weights(n: int, k: int) -> dict:
    from nds.index.weights import compute_weights

    a = np.random.default_rng(0).integers(0, k, n).astype(np.int32)
    before = _rss_mb()
    t0 = time.perf_counter()
    w = compute_weights(a, k)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = (1.0 / np.bincount(a, minlength=k))[a]
    base = time.perf_counter() - t0
    assert np.array_equal(w, ref)
    return {"n": n, "k": k, "seconds": ours, "baseline_seconds": base, "peak_rss_mb": _rss_mb(),
            "rss_before_mb": before, "output_mb": w.nbytes / 2**20}


def _child(args: list) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream-sizes", nargs="+", type=float, default=[1e5, 1e6])
    ap.add_argument("--real-n", type=float, default=1e4, help="images through EfficientNet-Lite0 (0 skips)")
    ap.add_argument("--real-batch", type=int, default=128)
    ap.add_argument("--weight-sizes", nargs="+", type=float, default=[1e6, 1e7])
    ap.add_argument("--k", type=int, default=1000, help="clusters for compute_weights")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = json.loads(args.child)
        if kind == "stream":
            res = _stream(int(rest[0]), Path(rest[1]))
        elif kind == "real":
            res = _real(int(rest[0]), Path(rest[1]), int(rest[2]))
        else:
            res = _weights(int(rest[0]), int(rest[1]))
        print(json.dumps(res))
        return

    with tempfile.TemporaryDirectory() as tmp:
        stream = [_child(["stream", int(n), tmp]) for n in args.stream_sizes]
        for s in stream:
            print(f"<!-- stream N={s['n']:.0e}: {s['images_per_second']} img/s -->", flush=True)
        real = _child(["real", int(args.real_n), tmp, args.real_batch]) if args.real_n else None
    weights = [_child(["weights", int(n), args.k]) for n in args.weight_sizes]

    lines = ["| figure | ours | baseline | ratio |", "|---|---|---|---|"]
    base = stream[0]
    for s in stream:
        added = s["peak_rss_mb"] - s["rss_before_mb"]
        base_added = base["peak_rss_mb"] - base["rss_before_mb"]
        s["rss_added_minus_output_mb"] = added - s["output_mb"]
        lines.append(f"| compute_features (stand-in) N={s['n']:.0e}: peak RSS added minus output, MiB "
                     f"(output {s['output_mb']:.0f} MiB) | {added - s['output_mb']:.0f} | "
                     f"{base_added - base['output_mb']:.0f} (N={base['n']:.0e}) | "
                     f"{(added - s['output_mb']) / max(base_added - base['output_mb'], 1e-9):.2f}x |")
        lines.append(f"| compute_features (stand-in) N={s['n']:.0e}: images/s | {s['images_per_second']:.0f} | "
                     f"{base['images_per_second']:.0f} (N={base['n']:.0e}) | "
                     f"{s['images_per_second'] / base['images_per_second']:.2f}x |")
    if real:
        real["raw_over_pipeline"] = real["raw_images_per_second"] / real["pipeline_images_per_second"]
        lines.append(f"| EfficientNet-Lite0 64 px, N={real['n']:.0e}, {real['threads']} threads: images/s, "
                     f"compute_features vs raw forward | {real['pipeline_images_per_second']:.0f} | "
                     f"{real['raw_images_per_second']:.0f} | {real['raw_over_pipeline']:.2f}x slower |")
    for w in weights:
        w["ratio"] = w["seconds"] / w["baseline_seconds"]
        lines.append(f"| compute_weights N={w['n']:.0e} K={w['k']} (s); peak RSS added "
                     f"{w['peak_rss_mb'] - w['rss_before_mb']:.0f} MiB for a {w['output_mb']:.0f} MiB output | "
                     f"{w['seconds']:.3f} | {w['baseline_seconds']:.3f} ((1/bincount)[a]) | {w['ratio']:.2f}x |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "index_scale", "python": platform.python_version(), "machine": platform.machine(),
        "stream": stream, "real": real, "weights": weights,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
