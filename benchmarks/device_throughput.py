"""Accelerator throughput (issue #18): extraction and expert training, CPU vs GPU in the same run.

    .venv/bin/python benchmarks/device_throughput.py                      # CPU and, where there is one, the GPU
    .venv/bin/python benchmarks/device_throughput.py --images 256 --steps 5 --concurrent 2 --repeats 2 --index-profile tiny  # 2 cores
    .venv/bin/python benchmarks/device_throughput.py --images 20000 --steps 50 --index-profile full  # on a GPU box

Figures, each at 32 / 64 / 128 px and on each device (the CPU column is the baseline; ratio =
GPU / CPU, > 1: the GPU is faster):

- extraction img/s: EfficientNet-Lite0 through ``nds.models.extractors.compute_features`` into a
  float16 file, the stage's code path on that device (the CPU path as today: fp32, batches read
  in-process; the GPU path: batches from DataLoader reader processes in pinned memory, autocast at
  ``extract.precision`` = auto, channels-last), synthetic 32 px corpus images resized to the size;
- expert training img/s (x4 rotations counted, as the bundle counts them): ``rotnet_small``
  optimisation steps on ready tensors at the size (the network pools globally, so it runs at any
  size; the index trains at 32 px), and at 32 px the whole recipe (``train_expert``: uint8 images,
  preprocessing, rotations, flips, held-out accuracy) with 1 expert and with ``--concurrent``
  experts at once (threads; on a GPU one CUDA stream each, as ``train_experts.workers`` runs them);
- with ``--index-profile P``: the whole index (corpus build excluded) on that corpus profile, the
  four stages as ``nds stage`` runs them, per device (``tiny`` fits 2 busy cores; ``full`` is the
  issue's 147k-image figure: 1,053 s on 2 CPU cores, target < 5 min on a data-centre GPU).

Each throughput is the best of ``--repeats`` runs. A device that is not there gets "no GPU on
this machine" in its column. Prints a markdown table and writes
benchmarks/results/device_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from nds.models import experts
from nds.models.device import DEVICE_ENV, device_name, resolve_device
from nds.models.extractors import compute_features, load_extractor
from nds.params import ExtractParams

RESULTS = Path(__file__).resolve().parent / "results" / "device_throughput.json"
NO_GPU = "no GPU on this machine"


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def extraction_ips(dev, size: int, n: int, batch: int, workers: int) -> float:
    """img/s of the extract stage's pipeline on ``dev`` (warm-up batch excluded)."""
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    ex = load_extractor(ExtractParams(image_size=size)).to(dev, "auto")
    ex(images[:batch])  # warm-up: cuDNN autotuning, lazy initialisation
    if ex.accelerated:
        from torch.utils.data import DataLoader

        class Batches:
            def __len__(self):
                return -(-n // batch)

            def __getitem__(self, i):
                return images[i * batch:(i + 1) * batch]

        batches = DataLoader(Batches(), batch_size=None, num_workers=workers, pin_memory=dev.type == "cuda",
                             prefetch_factor=4 if workers else None)
    else:
        batches = (images[s:s + batch] for s in range(0, n, batch))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        compute_features(batches, n, Path(tmp) / "f.npy", extractor=ex)
        return n / (time.perf_counter() - t0)


def training_steps_ips(dev, size: int, steps: int, batch: int) -> float:
    """img/s (rotated inputs) of rotnet_small optimisation steps on ready tensors of ``size`` px."""
    torch.manual_seed(0)
    model = experts.build_expert("rotnet_small").to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if dev.type == "cuda" else {}))
    x = torch.randn(batch, 3, size, size, device=dev)
    x, y = experts.rotate_batch(x)
    for i in range(steps + 3):
        if i == 3:  # after warm-up: kernel selection, allocator
            _sync(dev)
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(dev)
    return steps * len(x) / (time.perf_counter() - t0)


def recipe_ips(dev, concurrent: int, steps: int, batch: int, n_images: int) -> float:
    """Aggregate img/s of ``concurrent`` whole-recipe expert trainings at once (32 px)."""
    images = np.random.default_rng(1).integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    kw = dict(arch="rotnet_small", epochs=10_000, max_steps=steps, batch_size=batch, lr=0.003)
    if dev.type == "cuda":
        kw["device"] = dev
    experts.train_expert(images[:64], **{**kw, "max_steps": 2})  # warm-up
    threads_before = torch.get_num_threads()
    if dev.type == "cpu":  # as the stage does: the cores split between the experts
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // concurrent))
    done = []
    t0 = time.perf_counter()
    workers = [threading.Thread(target=lambda s=s: done.append(experts.train_expert(images, seed=s, **kw)[1]))
               for s in range(concurrent)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - t0
    torch.set_num_threads(threads_before)
    return sum(m["steps"] for m in done) * batch * experts.N_ROTATIONS / seconds


def index_seconds(dev_spec: str, profile: str) -> dict:
    """Seconds of the four index stages (``nds stage``'s code) on a fresh workspace of ``profile``."""
    import yaml

    from nds.config import Workspace
    from nds.corpus.build import build_corpus
    from nds.index.stages import STAGES, run_stage

    root = Path(tempfile.mkdtemp(prefix="nds-devbench-"))
    try:
        ws = Workspace(root)
        build_corpus(ws, profile, progress=False)
        repo = Path(__file__).resolve().parents[1]
        params = yaml.safe_load((repo / "params.yaml").read_text())
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        saved = os.environ.get(DEVICE_ENV)
        os.environ[DEVICE_ENV] = dev_spec
        try:
            seconds = {}
            for stage in STAGES:
                t0 = time.perf_counter()
                run_stage(stage, ws, progress=False)
                seconds[stage] = round(time.perf_counter() - t0, 1)
        finally:
            if saved is None:
                os.environ.pop(DEVICE_ENV, None)
            else:
                os.environ[DEVICE_ENV] = saved
        return {"total": round(sum(seconds.values()), 1), **seconds}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--images", type=int, default=2048, help="images per extraction measurement")
    ap.add_argument("--batch", type=int, default=128, help="extraction batch and expert batch (x4 rotations)")
    ap.add_argument("--steps", type=int, default=20, help="timed optimisation steps per training measurement")
    ap.add_argument("--concurrent", type=int, default=4, help="experts trained at once in the recipe row")
    ap.add_argument("--loader-workers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="each throughput figure is the best of this many runs")
    ap.add_argument("--index-profile", help="also time the whole index on this corpus profile (tiny, small, full)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    cpu = resolve_device("cpu")
    gpu = resolve_device("cuda") if torch.cuda.is_available() else None
    devices = {"cpu": cpu, "gpu": gpu}
    rows = []

    def measure(figure: str, fn) -> None:
        row = {"figure": figure}
        for label, dev in devices.items():  # the best of --repeats: shared machines are noisy
            row[label] = round(max(fn(dev) for _ in range(args.repeats)), 1) if dev is not None else None
        row["ratio"] = round(row["gpu"] / row["cpu"], 1) if row["gpu"] and row["cpu"] else None
        rows.append(row)
        print(f"  {figure}: cpu {row['cpu']} gpu {row['gpu'] if gpu else NO_GPU}", flush=True)

    print(f"cpu: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"gpu: {device_name(gpu) if gpu else NO_GPU}", flush=True)
    for size in args.sizes:
        measure(f"extraction img/s, {size} px", lambda d, s=size: extraction_ips(d, s, args.images, args.batch,
                                                                                  args.loader_workers))
    for size in args.sizes:
        measure(f"expert training img/s (steps), {size} px",
                lambda d, s=size: training_steps_ips(d, s, args.steps, args.batch))
    n_recipe = args.batch * 8
    measure("expert training img/s (whole recipe), 32 px, 1 expert",
            lambda d: recipe_ips(d, 1, args.steps, args.batch, n_recipe))
    measure(f"expert training img/s (whole recipe), 32 px, {args.concurrent} experts at once",
            lambda d: recipe_ips(d, args.concurrent, args.steps, args.batch, n_recipe))
    index = {}
    if args.index_profile:
        for label, dev in devices.items():
            index[label] = index_seconds(label if label == "cpu" else "cuda", args.index_profile) if dev else None
        rows.append({"figure": f"whole index, profile {args.index_profile}, seconds (corpus build excluded)",
                     "cpu": index["cpu"]["total"], "gpu": index["gpu"]["total"] if index["gpu"] else None,
                     "ratio": round(index["cpu"]["total"] / index["gpu"]["total"], 1) if index["gpu"] else None})

    print(f"\n| figure | CPU ({os.cpu_count()} cores) | GPU ({device_name(gpu) if gpu else 'none'}) | GPU speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        gpu_cell = r["gpu"] if r["gpu"] is not None else NO_GPU
        ratio = r["ratio"] if r["ratio"] is not None else "-"
        print(f"| {r['figure']} | {r['cpu']} | {gpu_cell} | {ratio} |")
    doc = {"benchmark": "device_throughput", "python": platform.python_version(), "torch": torch.__version__,
           "cpu_cores": os.cpu_count(), "gpu": device_name(gpu) if gpu else None, "args": vars(args),
           "rows": rows, "index_stage_seconds": index}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
