"""Indexing an outside image collection (issue #14): register + extract throughput, memory, Dask.

    .venv/bin/python benchmarks/ingest_scale.py --root . --sizes 2000,4000,8000          # 2 busy cores
    .venv/bin/python benchmarks/ingest_scale.py --root . --sizes 50000,100000,200000     # the issue's sizes

For each size N it writes N images as files (PNG and JPEG, 48-96 px, made from the workspace's
packaged corpus with random crops, flips and colour jitter, so no two are byte-equal), serves them
from moto's S3 on loopback, from ``http.server`` on loopback (a link table of ``http://`` urls) and
as WebDataset shards (local, and on the same S3 with ``--kinds s3-shards``), then measures in the same run:

- registration (``nds.corpus.registry.add_source``: list, fetch, sha256, decode-check) img/s per location kind;
- ingestion + extraction (the extract stage on the new source only: DataLoader reader processes fetch,
  verify and decode the originals, EfficientNet-Lite0 at ``--image-size``) img/s, against the raw model
  forward on ready uint8 batches of the same size and batch, timed in the same process right after
  (the baseline; target ratio >= 0.8);
- peak RSS of the extraction process at each N (flat in N: nothing scales with the collection but the
  features file on disk);
- img/s per core and a cost model (core-hours per million images, registration + extraction);
- with ``--dask``: the same shards on a 2-worker Dask cluster give identical features.

Prints a markdown table and writes benchmarks/results/ingest_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ingest_scale.json"
BUCKET = "nds-bench"


def make_images(src_data: Path, out: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` PNG/JPEG files under ``out/<dataset>/``, augmented from the workspace's source images.

    The images are read by catalog ``uri`` (`nds.corpus.read.load_images_at`), so a corpus whose
    packaged datasets are registered sources (no ``array``/``row`` columns) works as well as one
    built with arrays.
    """
    from PIL import Image

    from nds.corpus.read import load_catalog, load_images_at

    cat = load_catalog(src_data, split="source")
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, cat.num_rows, n)
    uris = np.asarray(cat.column("uri").to_pylist(), dtype=object)[pick]
    labels = np.asarray(cat.column("dataset").to_pylist(), dtype=object)[pick]
    paths = []
    for start in range(0, n, 1000):
        images = load_images_at(src_data, uris[start:start + 1000].tolist())
        for j, im in enumerate(images):
            i = start + j
            size = int(rng.integers(48, 97))
            img = Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)
            a = np.asarray(img, dtype=np.int16)
            a = np.clip(a * rng.uniform(0.8, 1.2, 3) + rng.integers(-20, 21, 3), 0, 255).astype(np.uint8)
            if rng.random() < 0.5:
                a = a[:, ::-1]
            crop = int(rng.integers(0, size // 8 + 1))
            a = a[crop:, crop:]
            path = out / str(labels[i]) / f"{i:07d}.{'png' if i % 2 else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(a)).save(path, quality=90)
            paths.append(path)
    return paths


def write_shards(paths: list[Path], root: Path, out: Path, per_shard: int = 1000) -> list[Path]:
    """WebDataset shards: ``<key>.<ext>`` + ``<key>.cls`` members, ``per_shard`` samples each."""
    import io
    import tarfile

    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(paths), per_shard):
        shard = out / f"shard-{s // per_shard:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for p in paths[s:s + per_shard]:
                key = p.stem
                for name, data in ((f"{key}{p.suffix}", p.read_bytes()), (f"{key}.cls", p.parent.name.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(shard)
    return shards


class Servers:
    """moto S3 and a static HTTP server, both on 127.0.0.1, for the benchmark's lifetime."""

    def __init__(self, folder: Path):
        import functools
        import http.server
        import threading

        import boto3
        from moto.server import ThreadedMotoServer

        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.s3_endpoint = f"http://{host}:{port}"
        os.environ["NDS_S3_ENDPOINT_URL"] = self.s3_endpoint
        boto3.client("s3", endpoint_url=self.s3_endpoint).create_bucket(Bucket=BUCKET)
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.http_base = f"http://127.0.0.1:{self.http.server_address[1]}"

    def upload(self, paths: list[Path], root: Path, prefix: str) -> str:
        from concurrent.futures import ThreadPoolExecutor

        import boto3

        client = boto3.client("s3", endpoint_url=self.s3_endpoint)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: client.upload_file(str(p), BUCKET, f"{prefix}/{p.relative_to(root)}"), paths))
        return f"s3://{BUCKET}/{prefix}/"

    def close(self) -> None:
        self.http.shutdown()
        self.moto.stop()


def _quiet_handler():
    import http.server

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    return Handler


_QuietHandler = _quiet_handler()


def link_table(paths: list[Path], root: Path, base: str, out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rel = [p.relative_to(root).as_posix() for p in paths]
    pq.write_table(pa.table({"url": [f"{base}/{r}" for r in rel], "label": [r.split("/")[0] for r in rel]}), out)
    return out


def extract_source(ws_root: Path, source: str) -> dict:
    """Run the extract stage in a child process (its peak RSS is the figure); the new source's shards only."""
    code = f"""
import json, resource, time, sys
from pathlib import Path
from nds.config import Workspace
from nds.index.extract import plan_extract, extract_shard, load_placed_extractor
from nds.corpus.read import load_catalog
from nds.params import load_params
ws = Workspace(Path({str(ws_root)!r})); params = load_params(ws.params_path)
cat = load_catalog(ws.data_dir, split="source")
ds = cat.column("dataset").to_pylist()
plan = [(a, b) for a, b in plan_extract(ws, params) if ds[a] == {source!r}]
ex = load_placed_extractor(params)
def peak_rss_mb():
    # VmHWM, this process image's own peak: ru_maxrss would also hold the benchmark process's resident
    # set at the fork before exec (its moto server keeps every uploaded object in memory).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter(); n = 0; model = 0.0; rss = []
for a, b in plan:
    e = extract_shard(ws, params, a, b, extractor=ex); n += e["n_samples"]; model += e["model_seconds"]
    rss.append(round(peak_rss_mb()))  # peak so far, MB, after each shard
wall = time.perf_counter() - t
# The baseline in the same process, right after: the model alone on ready uint8 batches of this size,
# through the same compute_features loop (same features file writes).
import tempfile
import numpy as np
from nds.models.extractors import compute_features
x = np.random.default_rng(0).integers(0, 256, (params.extract.batch_size, params.extract.image_size,
                                                params.extract.image_size, 3), dtype=np.uint8)
ex(x)
batches = max(4, min(n, 4096) // len(x))
with tempfile.TemporaryDirectory() as tmp:
    raw = compute_features((x for _ in range(batches)), batches * len(x), Path(tmp) / "raw.npy",
                           extractor=ex)["images_per_second"]
print(json.dumps({{"n": n, "seconds": wall, "model_seconds": model, "raw_forward_img_s": raw,
                   "peak_rss_mb": peak_rss_mb(),
                   "peak_rss_mb_by_shard": rss}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "NDS_ROOT": str(ws_root)})
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def dask_identical(ws_root: Path, source: str) -> bool:
    """The new source's shards on a 2-worker Dask cluster equal the in-process features."""
    from dask.distributed import Client, LocalCluster

    from nds.config import Workspace
    from nds.corpus.read import load_catalog
    from nds.index.extract import EXTRACT_CACHE, extract_shard, plan_extract
    from nds.params import load_params

    ws = Workspace(ws_root)
    params = load_params(ws.params_path)
    ds = load_catalog(ws.data_dir, split="source").column("dataset").to_pylist()
    plan = [(a, b) for a, b in plan_extract(ws, params) if ds[a] == source]
    local = [np.load(extract_shard(ws, params, a, b)["file"]) for a, b in plan]
    shutil.rmtree(ws.artifacts_dir / EXTRACT_CACHE)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, nanny=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        entries = client.gather(client.map(lambda ab: extract_shard(Workspace(ws_root), load_params(ws.params_path),
                                                                     *ab), plan, pure=False))
    return all(np.array_equal(a, np.load(e["file"])) for a, e in zip(local, entries))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="a workspace with a built packaged corpus (images are made from it)")
    ap.add_argument("--sizes", default="2000,4000,8000")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--kinds", default="s3,http,webdataset",
                    help="location kinds to register: s3 (one object per image), http (a link table), webdataset "
                         "(local shards), s3-shards (the shards on S3), folder")
    ap.add_argument("--dask", action="store_true", help="also check a 2-worker Dask run gives identical features")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import yaml

    from nds.config import Workspace
    from nds.corpus.registry import add_source
    from nds.index.extract import available_cpus

    sizes = [int(float(s)) for s in args.sizes.split(",")]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - {"s3", "http", "webdataset", "s3-shards", "folder"})
    if unknown:
        ap.error(f"--kinds: unknown {', '.join(unknown)}; choose from s3, http, webdataset, s3-shards, folder")
    cores = available_cpus()
    src_data = Workspace(Path(args.root).resolve()).data_dir
    rows = []
    with tempfile.TemporaryDirectory(prefix="nds-ingest-") as tmp:
        tmp = Path(tmp)
        for n in sizes:
            files = tmp / f"files-{n}"
            t = time.perf_counter()
            paths = make_images(src_data, files, n)
            made = time.perf_counter() - t
            servers = Servers(files)
            try:
                locations = {"folder": str(files)}
                if "s3" in kinds:
                    locations["s3"] = servers.upload(paths, files, f"img-{n}")
                if "http" in kinds:
                    locations["http"] = str(link_table(paths, files, servers.http_base, tmp / f"links-{n}.parquet"))
                if "webdataset" in kinds or "s3-shards" in kinds:
                    shards = write_shards(paths, files, tmp / f"shards-{n}")
                    locations["webdataset"] = str(shards[0].parent)
                    if "s3-shards" in kinds:
                        locations["s3-shards"] = servers.upload(shards, shards[0].parent, f"shards-{n}")
                for kind in [k for k in kinds if k in locations]:
                    ws = Workspace(tmp / f"ws-{n}-{kind}")
                    ws.data_dir.mkdir(parents=True)
                    ws.params_path.write_text(yaml.safe_dump({
                        "extract": {"image_size": args.image_size, "batch_size": args.batch,
                                    "loader_workers": args.loader_workers},
                        "cluster": {"method": "source-kmeans", "target_size": 1000}}))
                    t = time.perf_counter()
                    info = add_source(ws, "outside", locations[kind], progress=False, track=False)
                    reg_s = time.perf_counter() - t
                    ext = extract_source(ws.root, "outside")
                    baseline = ext["raw_forward_img_s"]
                    ips = ext["n"] / ext["seconds"]
                    row = {"n": n, "kind": kind, "registered": info["counts"]["registered"],
                           "register_img_s": round(n / reg_s, 1), "extract_img_s": round(ips, 1),
                           "raw_forward_img_s": round(baseline, 1), "ratio": round(ips / baseline, 3),
                           "peak_rss_mb": round(ext["peak_rss_mb"]), "img_s_per_core": round(ips / cores, 1),
                           "core_hours_per_million": round(cores * 1e6 * (reg_s / n + ext["seconds"] / ext["n"]) / 3600, 2),
                           "make_files_s": round(made, 1), "peak_rss_mb_by_shard": ext["peak_rss_mb_by_shard"]}
                    if args.dask and kind == kinds[0]:
                        row["dask_identical"] = dask_identical(ws.root, "outside")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    shutil.rmtree(ws.root)
            finally:
                servers.close()
                shutil.rmtree(files, ignore_errors=True)
    print("\n| N | location | registered | register img/s | ingest+extract img/s | raw forward img/s | ratio | "
          "peak RSS MB | img/s/core | core-h / 1M |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['kind']} | {r['registered']:,} | {r['register_img_s']} | {r['extract_img_s']} | "
              f"{r['raw_forward_img_s']} | {r['ratio']} | {r['peak_rss_mb']} | {r['img_s_per_core']} | "
              f"{r['core_hours_per_million']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cores": cores, "image_size": args.image_size, "batch": args.batch, "rows": rows},
                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
