"""A synthetic index in a workspace: the files the index stages write, without images or training.

    write_synthetic_index(root, n=10_000_000, k=1000)

Writes `artifacts/extract/index.parquet` (the catalog), `artifacts/experts/` (bundle.json and K
small placeholder expert files: they verify but are not networks) and `artifacts/weights/`
(weights.parquet, weights.json, the cluster layout), each folder swapped in atomically in the
pipeline's order (extract, experts, weights), so a running `nds serve` sees a republished index
exactly as it would see `nds index` finish. Every cluster lies inside one source dataset, as
with the default `dataset-kmeans` clustering; sizes vary like k-means clusters (lognormal).
The selection code reads these files as it reads a real index (load_current_index). Used by
benchmarks/service_load.py and the service tests (tests/serve/).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CHUNK = 2**20
DATASETS = ("mnist", "fashion", "glyphs", "sprites", "clipart", "animals", "emoji")
NETWORK = {"architecture": "synthetic", "input_size": 32, "feature_dim": 8,
           "preprocessing": {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3}}


def _fixed_strings(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    """`prefix` + zero-padded decimal `numbers` as one Arrow string array, built without Python loops."""
    digits = (numbers[:, None] // (10 ** np.arange(width - 1, -1, -1, dtype=np.int64))) % 10 + ord("0")
    head = np.frombuffer(prefix.encode(), dtype=np.uint8)
    rows = np.concatenate([np.broadcast_to(head, (numbers.size, head.size)), digits.astype(np.uint8)], axis=1)
    size = rows.shape[1]
    offsets = pa.py_buffer(np.arange(0, numbers.size * size + 1, size, dtype=np.int32).tobytes())
    return pa.StringArray.from_buffers(numbers.size, offsets, pa.py_buffer(np.ascontiguousarray(rows).tobytes()))


def _hex_strings(rng: np.random.Generator, n: int) -> pa.Array:
    raw = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    table = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    chars = np.empty((n, 64), dtype=np.uint8)
    chars[:, 0::2] = table[raw >> 4]
    chars[:, 1::2] = table[raw & 15]
    offsets = pa.py_buffer(np.arange(0, n * 64 + 1, 64, dtype=np.int32).tobytes())
    return pa.StringArray.from_buffers(n, offsets, pa.py_buffer(chars.tobytes()))


def cluster_plan(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each cluster (K,), cluster share (K,)): every cluster inside one dataset."""
    rng = np.random.default_rng(seed)
    owner = np.sort(np.arange(k) % min(k, len(DATASETS)))
    share = rng.lognormal(0.0, 0.5, k)
    return owner, share / share.sum()


def write_synthetic_index(root: Path, *, n: int, k: int, version: str | None = None, seed: int = 0,
                          prefix: str = "s") -> dict:
    """Write a synthetic index of `n` samples and `k` experts into the workspace `root`.

    version: the index version (default derived from n, k, seed). prefix: first letter(s) of
    every sample_id, so two versions can be told apart row by row. Returns
    {"index_version", "bundle_sha256", "k", "n", "datasets"}.
    """
    from nds._io import atomic_dir, file_sha256, write_json
    from nds.formats.bundle import write_bundle
    from nds.index.layout import build_cluster_layout, save_cluster_layout

    root = Path(root)
    version = version or "synth-" + hashlib.sha256(f"{n}-{k}-{seed}-{prefix}".encode()).hexdigest()[:12]
    rng = np.random.default_rng(seed)
    owner, share = cluster_plan(n, k, seed)
    cum = np.cumsum(share)
    assignments = np.empty(n, dtype=np.int32)
    rows_in = np.zeros(len(DATASETS), dtype=np.int64)  # next row of each dataset's image array
    names = pa.array(DATASETS)
    artifacts = root / "artifacts"
    with atomic_dir(artifacts / "extract") as out:
        writer = None
        for lo in range(0, n, CHUNK):
            m = min(CHUNK, n - lo)
            a = np.minimum(np.searchsorted(cum, rng.random(m), side="right"), k - 1).astype(np.int32)
            assignments[lo:lo + m] = a
            ds = owner[a]
            # row within its dataset's array: a running count per dataset
            order = np.argsort(ds, kind="stable")
            row = np.empty(m, dtype=np.int64)
            counts = np.bincount(ds, minlength=len(DATASETS))
            starts = np.cumsum(counts) - counts
            row[order] = np.arange(m) - np.repeat(starts, counts) + np.repeat(rows_in, counts)
            rows_in += counts
            dataset = names.take(pa.array(ds))
            uri = pc.binary_join_element_wise(pc.binary_join_element_wise(dataset, pa.scalar(".npy"), ""),
                                              pc.cast(pa.array(row), pa.string()), "#")
            chunk = pa.table({
                "sample_id": _fixed_strings(prefix, np.arange(lo, lo + m, dtype=np.int64), 9),
                "dataset": dataset,
                "uri": uri,
                "label": pc.cast(pa.array(rng.integers(0, 10, m)), pa.string()),
                "sha256": _hex_strings(rng, m),
            })
            writer = writer or pq.ParquetWriter(out / "index.parquet", chunk.schema)
            writer.write_table(chunk)
        writer.close()
    with atomic_dir(artifacts / "experts") as out:
        sizes = np.bincount(assignments, minlength=k)
        experts = []
        for c in range(k):
            path = out / f"expert_{c:03d}.pt"
            path.write_bytes(hashlib.sha256(f"{version}-{c}".encode()).digest())
            experts.append({"expert": c, "file": path.name, "sha256": file_sha256(path), "n_images": int(sizes[c]),
                            "rotation_accuracy": 0.5})
        bundle = write_bundle(out, index_version=version, network=NETWORK, experts=experts)
    with atomic_dir(artifacts / "weights") as out:
        index = pq.read_table(artifacts / "extract" / "index.parquet", columns=["sample_id", "dataset", "label"])
        inv = np.where(sizes > 0, 1.0 / np.maximum(sizes, 1), 0.0)
        pq.write_table(index.append_column("expert", pa.array(assignments))
                       .append_column("weight", pa.array(inv[assignments])), out / "weights.parquet")
        del index
        save_cluster_layout(build_cluster_layout(assignments, k), out / "layout")
        summary = {"index_version": version, "n_samples": n, "k": k, "bundle_sha256": bundle["bundle_sha256"],
                   "n_datasets": int(len(set(owner.tolist()))), "corpus_profile": "synthetic"}
        write_json(out / "weights.json", summary)
    return {"index_version": version, "bundle_sha256": bundle["bundle_sha256"], "k": k, "n": n,
            "datasets": sorted({DATASETS[d] for d in owner})}


def synthetic_scores(info: dict, *, favour: int = 0, mode: str = "rotation") -> dict:
    """A scores.json document for a synthetic index that favours expert `favour`."""
    scores = [0.3] * info["k"]
    scores[favour % info["k"]] = 0.9
    return {"format": 1, "index_version": info["index_version"], "bundle_sha256": info["bundle_sha256"],
            "mode": mode, "k": info["k"], "scores": scores}
