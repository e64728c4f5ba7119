"""Building the corpus: the packaged demo datasets -> ordinary registered sources in ``data/``.

Each packaged dataset's chosen images are written once as WebDataset shards
(``data/packaged/<dataset>/<dataset>-NNNNN.tar``: per sample a PNG, and a ``.json`` with its key,
label and split), then registered through the same path as ``nds source add``
(`nds.corpus.registry.register_listing`): ``data/sources/<dataset>/`` holds its catalog, whose
``uri`` names the shard member (``data/packaged/<dataset>/<shard>.tar#<member>``, relative to the
workspace). Everything downstream (extraction's streaming loader, links, downloads) is the generic
path. The layout of ``data/`` is described in :mod:`nds.corpus.read`.

The bytes depend on the packages' content only (fixed tar headers, stored-block PNGs, no
timestamps), so ``data.dvc`` is the same on every machine with the same packages.

Profiles pick a subset per dataset and split by ranking samples on a hash of their
``sample_id`` and taking the first *n* usable ones, so the choice is the same on every
machine and ``tiny`` is a subset of ``small`` is a subset of ``full``.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np

from nds._io import atomic_dir, file_sha256
from nds._registry import PROFILES, SOURCES
from nds.config import IMAGE_SIZE, Workspace
from nds.corpus.read import PACKAGED_DIR, SPLITS, SUMMARY_FILE, image_sha256
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
#: Samples per packaged WebDataset shard.
SHARD_SAMPLES = 10_000


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


def _png(image: np.ndarray) -> bytes:
    """A stored-block PNG (no compression, no timestamp): the same bytes from any zlib build."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(dataset: str, rows: list[dict], folder: Path) -> list[Path]:
    """``rows`` of one dataset (in sample_id order) as WebDataset shards in ``folder``.

    Members ``NNNNNN.png`` + ``NNNNNN.json`` ({"key", "label", "split"}); the key is the
    sample_id without the dataset prefix, so registration gives ``<dataset>/<key>`` whatever the
    shard layout or profile.
    """
    folder.mkdir(parents=True)
    paths = []
    for first in range(0, len(rows), SHARD_SAMPLES):
        path = folder / f"{dataset}-{first // SHARD_SAMPLES:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, r in enumerate(rows[first:first + SHARD_SAMPLES], start=first):
                meta = {"key": r["sample_id"].removeprefix(f"{dataset}:"), "label": r["label"], "split": r["split"]}
                _add_member(tar, f"{i:06d}.png", _png(r["image"]))
                _add_member(tar, f"{i:06d}.json", json.dumps(meta, sort_keys=True).encode())
        paths.append(path)
    return paths


def _register_packaged(records: list[dict], data_dir: Path, name: str, progress: bool) -> dict[str, dict]:
    """Write each dataset's shards and register them like any source; source.json per dataset."""
    from nds.corpus.locations import shard_listing
    from nds.corpus.registry import register_listing

    infos = {}
    for dataset in sorted({r["dataset"] for r in records}):
        rows = [r for r in records if r["dataset"] == dataset]
        folder = data_dir / PACKAGED_DIR / dataset
        shards = [(str(p), f"sha256:{file_sha256(p)}") for p in write_shards(dataset, rows, folder)]
        listing = shard_listing(shards, "column", str(folder))
        infos[dataset] = register_listing(data_dir, dataset, str(folder), listing, progress=progress,
                                          relative_to=(data_dir, name), stamp=False)
        if infos[dataset]["counts"]["registered"] != len(rows):  # the build dropped every duplicate already
            raise NDSError(f"corpus {dataset}: {len(rows)} images written, {infos[dataset]['counts']} registered")
    return infos


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
        _register_packaged(records, tmp, data_dir.name, progress)
        summary = _summary(profile, records, seconds, dropped, sources_dir, time.perf_counter() - started)
        (tmp / SUMMARY_FILE).write_text(json.dumps(_content_facts(summary), indent=2) + "\n")
        _keep_outside_sources(data_dir, tmp)
    log.info("corpus %s: %d images (%s) in %.1fs -> %s", profile, summary["total"],
             ", ".join(f"{k} {v}" for k, v in summary["totals_by_split"].items()), summary["build_seconds"]["total"], data_dir)
    return summary


def _keep_outside_sources(data_dir: Path, new: Path) -> None:
    """Copy the registered outside sources into the new corpus: they are not the build's to drop
    (the packaged datasets' own sources are rebuilt, never carried over)."""
    old = data_dir / REGISTERED_DIR
    if not old.is_dir():
        return
    for folder in sorted(old.iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and folder.name not in DATASETS:  # not a half-written add
            shutil.copytree(folder, new / REGISTERED_DIR / folder.name, symlinks=True)


def _summary(profile: str, records: list[dict], seconds: dict, dropped: dict, sources_dir: Path, total_s: float) -> dict:
    datasets = [r["dataset"] for r in records]
    splits = [r["split"] for r in records]
    names = [d for d in DATASETS if d in PROFILES[profile]]
    counts = {d: {s: 0 for s in SPLITS} for d in names}
    for d, s in zip(datasets, splits):
        counts[d][s] += 1
    return {
        "profile": profile,
        "image_size": IMAGE_SIZE,
        "counts": counts,
        "totals_by_split": {s: splits.count(s) for s in SPLITS},
        "total": len(records),
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
