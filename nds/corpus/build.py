"""Building the corpus: packaged sources -> ``data/`` (image arrays, catalog, corpus.json).

The layout of ``data/`` is described in :mod:`nds.corpus.read`.

Profiles pick a subset per dataset and split by ranking samples on a hash of their
``sample_id`` and taking the first *n* usable ones, so the choice is the same on every
machine and ``tiny`` is a subset of ``small`` is a subset of ``full``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nds._io import atomic_dir
from nds._registry import PROFILES, SOURCES
from nds.config import IMAGE_SIZE, Workspace
from nds.corpus.read import (
    CATALOG_COLUMNS,
    CATALOG_FILE,
    CATALOG_SCHEMA,
    IMAGES_DIR,
    SPLITS,
    SUMMARY_FILE,
    image_sha256,
)
from nds.corpus.registry import SOURCES_DIR as REGISTERED_DIR
from nds.corpus.sources import HOLDOUT, SOURCE, Candidate, rank_key
from nds.errors import NDSError

log = logging.getLogger(__name__)

#: The datasets in build order (also the order of corpus.json's maps).
DATASETS: tuple[str, ...] = ("mnist", "fashion", "animals", "glyphs", "clipart", "sprites", "emoji")

# Profiles: dataset -> (max source images, max hold-out images); None takes everything.
#: Enough of every domain for tests; builds in a few seconds.
PROFILES["tiny"] = {name: (250, 50) for name in DATASETS}
#: The demo: >= 20k source images over 7 domains, built in well under a minute on 2 cores.
PROFILES["small"] = {
    "mnist": (4000, 1000),
    "fashion": (4000, 1000),
    "animals": (3000, 500),
    "glyphs": (4000, 1000),
    "clipart": (3000, 500),
    "sprites": (3000, 500),
    "emoji": (1500, 300),
}
PROFILES["full"] = {name: (None, None) for name in DATASETS}
#: No packaged dataset: index only the sources registered with `nds source add`.
PROFILES["none"] = {}

#: Extra candidates decoded beyond what is still missing, so one pass usually fills a
#: profile even when a few candidates turn out unusable.
OVERDRAW = 1.05
#: Candidates decoded per progress-bar step.
LOAD_CHUNK = 500


def rank_candidates(dataset: str, sources_dir: Path) -> dict[str, list[Candidate]]:
    """Every candidate of ``dataset`` per split, in the hash order profiles draw from."""
    source = SOURCES[dataset]
    ranked: dict[str, list[Candidate]] = {split: [] for split in SPLITS}
    for candidate in source.list_candidates(sources_dir):
        ranked[candidate.split].append(candidate)
    for split in SPLITS:
        ranked[split].sort(key=lambda c: (rank_key(c.sample_id), c.sample_id))
    return ranked


def select_keys(dataset: str, profile: str, *, sources_dir: Path) -> dict[str, list[str]]:
    """Sample ids a profile decodes first, per split, without decoding anything.

    The build keeps these unless one proves unusable at decode time (then it takes the
    next in rank order) or is an exact duplicate.
    """
    profile_caps = PROFILES[profile]
    caps = dict(zip(SPLITS, profile_caps[SOURCES.check(dataset)]))
    ranked = rank_candidates(dataset, sources_dir)
    return {split: [c.sample_id for c in ranked[split][: caps[split]]] for split in SPLITS}


def _take_usable(
    dataset: str, ranked: list[Candidate], cap: int | None, sources_dir: Path, bar
) -> tuple[list[Candidate], list[np.ndarray]]:
    """First ``cap`` candidates in rank order whose image loads; decodes in chunks."""
    want = len(ranked) if cap is None else min(cap, len(ranked))
    kept: list[Candidate] = []
    images: list[np.ndarray] = []
    pos = 0
    while len(kept) < want and pos < len(ranked):
        missing = want - len(kept)
        batch = ranked[pos : pos + min(LOAD_CHUNK, int(missing * OVERDRAW) + 1)]
        pos += len(batch)
        for candidate, image in zip(batch, SOURCES[dataset].load(batch, sources_dir)):
            if image is not None and len(kept) < want:
                kept.append(candidate)
                images.append(image)
        bar.update(min(len(batch), missing))
    if len(kept) < want:
        # Expected when taking everything (cap None); a capped profile falling short is news.
        level = logging.INFO if cap is None else logging.WARNING
        log.log(level, "%s: %d usable of %d candidates decoded", dataset, len(kept), pos)
    return kept, images


def _load_dataset(dataset: str, caps: tuple[int | None, int | None], sources_dir: Path, progress: bool) -> list[dict]:
    """Chosen samples of one dataset as records with their image and hash."""
    from tqdm.auto import tqdm

    ranked = rank_candidates(dataset, sources_dir)
    total = sum(len(ranked[s]) if cap is None else min(cap, len(ranked[s])) for s, cap in zip(SPLITS, caps))
    records = []
    with tqdm(total=total, desc=f"corpus {dataset}", unit="img", disable=not progress, leave=False) as bar:
        for split, cap in zip(SPLITS, caps):
            kept, images = _take_usable(dataset, ranked[split], cap, sources_dir, bar)
            for candidate, image in zip(kept, images):
                if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or image.dtype != np.uint8:
                    raise NDSError(f"{dataset} reader produced {image.shape} {image.dtype} for {candidate.sample_id}")
                records.append(
                    {"sample_id": candidate.sample_id, "dataset": dataset, "label": candidate.label,
                     "split": split, "sha256": image_sha256(image), "image": image}
                )
    return records


def _drop_duplicates(records: list[dict]) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """Exact duplicates (same stored bytes), counted per dataset of the dropped copy.

    The source keeps the first copy by (dataset, sample_id). A hold-out image is dropped
    if it also occurs in the source (a target task must never be in the index) or earlier
    in the hold-out.
    """
    records = sorted(records, key=lambda r: (r["dataset"], r["sample_id"]))
    present = {r["dataset"] for r in records}
    dropped = {d: {"source_duplicates": 0, "holdout_in_source": 0, "holdout_duplicates": 0}
               for d in DATASETS if d in present}
    drop: set[int] = set()
    source_hashes: set[str] = set()
    for i, record in enumerate(records):
        if record["split"] == SOURCE and record["sha256"] in source_hashes:
            dropped[record["dataset"]]["source_duplicates"] += 1
            drop.add(i)
        elif record["split"] == SOURCE:
            source_hashes.add(record["sha256"])
    holdout_hashes: set[str] = set()
    for i, record in enumerate(records):
        if record["split"] != HOLDOUT:
            continue
        if record["sha256"] in source_hashes:
            dropped[record["dataset"]]["holdout_in_source"] += 1
            drop.add(i)
        elif record["sha256"] in holdout_hashes:
            dropped[record["dataset"]]["holdout_duplicates"] += 1
            drop.add(i)
        else:
            holdout_hashes.add(record["sha256"])
    return [r for i, r in enumerate(records) if i not in drop], dropped


def _write(records: list[dict], out_dir: Path) -> pa.Table:
    """Arrays per dataset and the catalog, both in (dataset, sample_id) order."""
    (out_dir / IMAGES_DIR).mkdir(parents=True)
    columns: dict[str, list] = {name: [] for name in CATALOG_COLUMNS}
    for dataset in sorted({r["dataset"] for r in records}):
        rows = [r for r in records if r["dataset"] == dataset]
        array = f"{IMAGES_DIR}/{dataset}.npy"
        np.save(out_dir / array, np.stack([r["image"] for r in rows]))
        for i, r in enumerate(rows):
            for name in ("sample_id", "dataset", "label", "split", "sha256"):
                columns[name].append(r[name])
            columns["uri"].append(f"data/{array}#{i}")
            columns["array"].append(array)
            columns["row"].append(i)
    table = pa.table(columns, schema=CATALOG_SCHEMA)
    pq.write_table(table, out_dir / CATALOG_FILE)
    return table


def build_corpus(workspace: Workspace, profile: str = "small", *, progress: bool = True) -> dict:
    """Build ``workspace.data_dir`` from the packaged sources for ``profile``; return corpus.json.

    The corpus is built in a sibling temporary folder and swapped in at the end
    (``nds._io.atomic_dir``), so a failure leaves the previous corpus (if any) as it was.
    Registered sources (``data/sources/``, ``nds.corpus.registry``) are carried over unchanged.
    """
    caps = PROFILES[profile]
    sources_dir = workspace.sources_dir
    datasets = [d for d in DATASETS if d in caps]
    for dataset in datasets:  # fail before any work if a package is missing
        SOURCES[dataset].check(sources_dir)

    started = time.perf_counter()
    data_dir = workspace.data_dir
    with atomic_dir(data_dir) as tmp:
        records, seconds = [], {}
        for dataset in datasets:
            t0 = time.perf_counter()
            records.extend(_load_dataset(dataset, caps[dataset], sources_dir, progress))
            seconds[dataset] = round(time.perf_counter() - t0, 2)
            log.info("corpus %s: %d images in %.1fs", dataset, sum(r["dataset"] == dataset for r in records), seconds[dataset])
        records, dropped = _drop_duplicates(records)
        table = _write(records, tmp)
        summary = _summary(profile, table, seconds, dropped, sources_dir, time.perf_counter() - started)
        (tmp / SUMMARY_FILE).write_text(json.dumps(_content_facts(summary), indent=2) + "\n")
        if (data_dir / REGISTERED_DIR).is_dir():  # registered outside sources are not the build's to drop
            shutil.copytree(data_dir / REGISTERED_DIR, tmp / REGISTERED_DIR, symlinks=True,
                            ignore=shutil.ignore_patterns(".*"))  # not a half-written add
    log.info("corpus %s: %d images (%s) in %.1fs -> %s", profile, summary["total"],
             ", ".join(f"{k} {v}" for k, v in summary["totals_by_split"].items()), summary["build_seconds"]["total"], data_dir)
    return summary


def _summary(profile: str, table: pa.Table, seconds: dict, dropped: dict, sources_dir: Path, total_s: float) -> dict:
    datasets = table.column("dataset").to_pylist()
    splits = table.column("split").to_pylist()
    names = [d for d in DATASETS if d in PROFILES[profile]]
    counts = {d: {s: 0 for s in SPLITS} for d in names}
    for d, s in zip(datasets, splits):
        counts[d][s] += 1
    return {
        "profile": profile,
        "image_size": IMAGE_SIZE,
        "counts": counts,
        "totals_by_split": {s: splits.count(s) for s in SPLITS},
        "total": table.num_rows,
        "caps": {d: dict(zip(SPLITS, PROFILES[profile][d])) for d in names},
        "duplicates_dropped": dropped,
        "build_seconds": {**seconds, "total": round(total_s, 2)},
        "sources": {d: SOURCES[d].describe(sources_dir) for d in names},
    }


def _content_facts(summary: dict) -> dict:
    """What corpus.json keeps: facts about the content only, so the same packages give the
    same bytes (and the same DVC hash) on any machine. Timings and local paths stay in logs."""
    facts = {k: v for k, v in summary.items() if k != "build_seconds"}
    facts["sources"] = {d: {k: v for k, v in info.items() if k != "path"} for d, info in summary["sources"].items()}
    return facts
