"""One selection request end to end (NDS "server, online"), and the audit trail of past ones.

scores.json -> checks against the current index -> softmax(z/T) over experts -> p(x) ->
budgeted draw without replacement -> export manifest -> a selection record.

Records are append-only Parquet files (one per selection, written by rename) next to the
DuckDB warehouse and exposed there as the `selections` view: selection runs never open the
DuckDB file for writing, so any number can run at once without contending for its single
writer lock or corrupting it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nds._io import atomic_file, new_run_id
from nds.config import Workspace
from nds.errors import InvalidInputError, NDSError, NotFoundError
from nds.formats import manifest
from nds.formats.bundle import load_bundle
from nds.formats.scores import load_scores
from nds.index.layout import load_cluster_layout
from nds.platform import storage, warehouse
from nds.select.probability import (
    budget_from_number, compute_expert_weights, compute_member_probabilities, compute_sample_probabilities,
    resolve_budget,
)
from nds.select import links
from nds.select.request import DEFAULT_TEMPERATURE, SelectRequest  # noqa: F401  (re-exported)
from nds.select.samplers import DEFAULT_SAMPLER, draw_with_reserve, reserve_count, select_samples
from nds.select.samplers.clustered import select_samples_clustered

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Index:
    """The current index as the selection needs it (rows in feature order)."""

    version: str
    bundle_sha256: str
    k: int
    catalog: pa.Table  # sample_id, dataset, uri, label, sha256
    assignments: np.ndarray  # (n,) int32
    layout: tuple[np.ndarray, np.ndarray] | None = None  # (order, offsets) for the clustered sampler
    #: () -> the pixel_sha256 column (index order), read when an exclusion first needs it; None: an
    #: index written before the column existed (its packaged rows' sha256 is the pixel hash).
    pixel_hashes: Callable[[], pa.ChunkedArray] | None = None


def load_current_index(ws: Workspace) -> Index:
    """The index the weights stage last wrote: bundle identity, catalog, assignments, layout."""
    bundle = load_bundle(ws.stage_dir("experts"), verify=False)
    wpath = ws.stage_dir("weights") / "weights.parquet"
    ipath = ws.stage_dir("extract") / "index.parquet"
    for p in (wpath, ipath):
        if not p.exists():
            raise NotFoundError(f"{p} is missing: build the index first (`nds index`)")
    w = pq.read_table(wpath, columns=["sample_id", "expert"])
    catalog = pq.read_table(ipath, columns=["sample_id", "dataset", "uri", "label", "sha256"])
    if w.column("sample_id") != catalog.column("sample_id"):
        raise NDSError("weights and index order disagree: rerun `nds index` (or `dvc repro`)")
    layout_dir = ws.stage_dir("weights") / "layout"
    layout = load_cluster_layout(layout_dir) if layout_dir.exists() else None
    k = int(bundle["k"])
    if layout is not None and (len(layout[1]) != k + 1 or int(layout[1][-1]) != catalog.num_rows):
        raise NDSError(f"{layout_dir} does not match the index ({k} experts, {catalog.num_rows} samples): rerun compute_weights")
    return Index(
        version=bundle["index_version"],
        bundle_sha256=bundle["bundle_sha256"],
        k=k,
        catalog=catalog,
        assignments=w.column("expert").to_numpy().astype(np.int32),
        layout=layout,
        pixel_hashes=_column_reader(ipath, "pixel_sha256"),
    )


def _column_reader(path: Path, name: str) -> Callable[[], pa.ChunkedArray] | None:
    """A function reading column `name` of the Parquet file at `path` once (None if it has none)."""
    if name not in pq.read_schema(path).names:
        return None
    return functools.lru_cache(maxsize=1)(lambda: pq.read_table(path, columns=[name]).column(name))


def check_scores(scores: dict, index: Index) -> None:
    if scores["index_version"] != index.version:
        raise InvalidInputError(
            f"scores are for index {scores['index_version']} but the server holds {index.version}: "
            "fetch the current expert bundle (`nds client fetch-experts`) and score again"
        )
    if scores.get("bundle_sha256") != index.bundle_sha256:
        raise InvalidInputError("scores were made with a different expert bundle (checksum mismatch): fetch the bundle and score again")
    if len(scores["scores"]) != index.k:
        raise InvalidInputError(f"scores hold {len(scores['scores'])} values but the index has {index.k} experts: score again")


def eligible_mask(index: Index, *, datasets: list[str] | None, exclude: list[str]) -> tuple[np.ndarray, int]:
    """(n,) bool of samples that may be drawn, and how many exclusions matched."""
    n = index.catalog.num_rows
    mask = np.ones(n, dtype=bool)
    if datasets is not None:
        column = index.catalog.column("dataset")  # plain or dictionary-encoded strings: compute reads both
        known = sorted(v for v in pc.unique(column).to_pylist() if v is not None)
        unknown = sorted(set(datasets) - set(known))
        if unknown or not datasets:
            error = NotFoundError if unknown else InvalidInputError
            raise error(f"unknown dataset filter {unknown or datasets}: choose from {known}")
        mask &= np.asarray(pc.is_in(column, value_set=pa.array(list(datasets), pa.string()))
                           .to_numpy(zero_copy_only=False), dtype=bool)
    n_excluded = 0
    if exclude:
        drop = pa.array(sorted(set(exclude)), pa.string())
        hit = pc.or_(pc.is_in(index.catalog.column("sample_id"), value_set=drop),
                     pc.is_in(index.catalog.column("sha256"), value_set=drop))
        if index.pixel_hashes is not None:  # a client's hashes are of decoded corpus-format pixels
            hit = pc.or_(hit, pc.is_in(index.pixel_hashes(), value_set=drop))
        hit = np.asarray(hit.to_numpy(zero_copy_only=False), dtype=bool)
        n_excluded = int(hit.sum())
        mask &= ~hit
    return mask, n_excluded


def new_selection_id() -> str:
    """Time-ordered and unguessable (128 random bits)."""
    return new_run_id("sel")


def manifests_root(ws: Workspace) -> Path:
    env = os.environ.get("NDS_MANIFESTS")
    return Path(env).resolve() if env else ws.root / "manifests"


def selections_dir(ws: Workspace) -> Path:
    return warehouse.selections_folder(ws.warehouse_path)


def run_selection(ws: Workspace, request: SelectRequest, *, out_dir: Path | None = None,
                  selection_id: str | None = None, origin: str = "cli", requester: str | None = None,
                  flow_run_id: str | None = None, index: Index | None = None, defer_parquet: bool = False) -> dict:
    """Validate, draw, write the manifest, record the selection; returns the manifest summary.

    `out_dir` (a trusted local path, from the CLI) overrides `request.out_name`, which is
    resolved inside the manifests root and may not escape it. Nothing is written on bad input.
    `origin` (one of warehouse.ORIGINS), `requester` and `flow_run_id` go into the audit row.
    `index`: the index already in memory (a long-running server keeps it loaded); default:
    read the current one from the workspace (load_current_index).
    `defer_parquet`: leave manifest.parquet to its first reader (manifest.write_parquet_form; a
    server that answers downloads), unless the manifest is published to $NDS_STORAGE_URL.
    """
    origin = warehouse.check_origin(origin)
    t0 = time.perf_counter()
    selection_id = selection_id or new_selection_id()
    if out_dir is None:
        root = manifests_root(ws)
        target = manifest.checked_out_dir(Path(request.out_name or selection_id), root)
    else:
        target = Path(out_dir).resolve()
    scores = load_scores(request.scores if request.scores is not None else Path(request.scores_path))
    index = index if index is not None else load_current_index(ws)
    check_scores(scores, index)
    exclude = list(request.exclude) + list(scores.get("exclude_sha256") or [])
    method = request.method
    if method == "auto":
        method = "clustered" if index.layout is not None else DEFAULT_SAMPLER
    if method == "clustered" and index.layout is not None and request.datasets is None and not exclude:
        # Nothing filtered: every sample is eligible and p(x) = member[c(x)] holds K numbers, so
        # the request costs O(K + B), not O(N) (the values compute_sample_probabilities gives).
        mask, n_excluded, n_eligible = None, 0, index.catalog.num_rows
        sizes = np.diff(index.layout[1])
        budget = resolve_budget(budget_from_number(request.budget), n_eligible)
        weights = compute_expert_weights(scores["scores"], temperature=request.temperature)
        member = compute_member_probabilities(weights, sizes)
        n_positive = int(sizes[member > 0].sum())
    else:
        mask, n_excluded = eligible_mask(index, datasets=request.datasets, exclude=exclude)
        n_eligible = int(mask.sum())
        if n_eligible == 0:
            raise InvalidInputError("no source sample is eligible after the dataset filter and exclusions: relax them")
        budget = resolve_budget(budget_from_number(request.budget), n_eligible)
        weights = compute_expert_weights(scores["scores"], temperature=request.temperature)
        p = compute_sample_probabilities(index.assignments, weights, eligible=mask)
        n_positive = int((p > 0).sum())
    reserve = reserve_count(budget, request.fill)
    if budget + reserve > n_positive:
        extra = f" plus a reserve of {reserve} (fill {request.fill:g})" if reserve else ""
        fix = "lower it or the fill" if reserve else "lower it"
        raise InvalidInputError(f"budget {budget}{extra} exceeds the {n_positive} samples with non-zero probability: {fix}")
    if method == "clustered" and index.layout is None:
        raise NotFoundError("this index has no cluster layout (built before it existed): rerun compute_weights "
                            "(`nds stage compute_weights`) or use method es-keys")
    t_draw = time.perf_counter()
    excluded = None if method != "clustered" or mask is None or mask.all() else np.flatnonzero(~mask)

    def draw(n: int, seed: int, drawn: np.ndarray | None) -> np.ndarray:
        if method == "clustered":
            skip = excluded if drawn is None else drawn if excluded is None else np.concatenate([excluded, drawn])
            return select_samples_clustered(index.layout, weights, n, seed=seed, excluded=skip,
                                            assignments=index.assignments)
        q = p
        if drawn is not None:  # the samples left, renormalised: the law of the next draws
            q = p.copy()
            q[drawn] = 0.0
            q /= q.sum()
        return select_samples(q, n, seed=seed, method=method, assignments=index.assignments)

    picked = draw_with_reserve(draw, budget, reserve, seed=request.seed, method=method)
    draw_s = time.perf_counter() - t_draw
    # Only the drawn rows are read from the catalog, once (a memory-mapped one stays on disk).
    experts = np.asarray(index.assignments[picked])
    chosen_p = member[experts] if mask is None else p[picked]
    table = manifest.manifest_from_rows(index.catalog.select(list(manifest.CATALOG_COLUMNS)).take(picked),
                                        chosen_p, experts)
    params = request.model_dump(exclude={"scores", "scores_path", "exclude"})
    params["n_exclude"] = len(request.exclude)
    presigned = None
    if request.presign_expiry_s:
        # Before anything is written: a local corpus is refused here, not after the manifest exists.
        presigned = links.presigned_sidecar(ws, table, request.presign_expiry_s)
    summary = manifest.write_manifest(
        table,
        target,
        parquet=not defer_parquet or bool(storage.configured_storage_url()),  # a published manifest is complete
        summary_extra={
            "selection_id": selection_id,
            "index_version": index.version,
            "bundle_sha256": index.bundle_sha256,
            "mode": scores["mode"],
            "parameters": params,
            "budget": budget,
            "reserve": reserve,
            "n_eligible": n_eligible,
            "n_excluded": n_excluded,
            "expert_weights": np.round(weights, 6).tolist(),
            "sampler": method,
            "draw_seconds": round(draw_s, 4),
            **({"presigned_urls": presigned["info"]} if presigned else {}),
        },
    )
    try:
        if presigned:
            write_urls(target, presigned["table"])
        summary["manifest_location"] = str(target)
        store_uri = publish_manifest(target, selection_id)
        if store_uri:
            summary["local_manifest"] = str(target)
            summary["manifest_location"] = store_uri
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        record_selection(ws, summary, scores=scores["scores"], origin=origin, requester=requester,
                         flow_run_id=flow_run_id, datasets=request.datasets)
    except BaseException:
        # A failed run leaves no manifest that no selection row points at: nobody downloads an
        # unrecorded selection, and a retry under the same name is not refused as a clash.
        # (write_manifest refused a non-empty target, so everything in it is this run's.)
        shutil.rmtree(target, ignore_errors=True)
        raise
    log.info("selection %s: %d of %d eligible samples -> %s", selection_id, budget, n_eligible, target)
    return summary


def write_urls(folder: Path, table: pa.Table) -> Path:
    import pyarrow.csv as pacsv

    final = Path(folder) / manifest.URLS_NAME
    with atomic_file(final) as tmp:
        pacsv.write_csv(table, tmp)
    return final


def publish_manifest(folder: Path, selection_id: str) -> str | None:
    """Copy the manifest folder to `manifests/<selection_id>/` in $NDS_STORAGE_URL, if set.

    summary.json goes last: a reader that finds it finds every file it names.
    """
    if not storage.configured_storage_url():
        return None
    store = storage.open_storage()
    prefix = f"manifests/{selection_id}"
    for name in (manifest.PARQUET_NAME, manifest.CSV_NAME, manifest.URLS_NAME, manifest.SUMMARY_NAME):
        if (Path(folder) / name).exists():
            store.put_file(f"{prefix}/{name}", Path(folder) / name)
    location = store.uri(prefix) + "/"
    log.info("published manifest %s to %s", selection_id, location)
    return location


def record_selection(ws: Workspace, summary: dict, *, scores: list[float], origin: str = "cli",
                     requester: str | None = None, flow_run_id: str | None = None,
                     datasets: list[str] | None = None) -> Path:
    """Append the selection's audit row as its own Parquet file (atomic rename).

    `origin` (warehouse.ORIGINS), `requester`, `flow_run_id` and the dataset filter (None: all)
    tell a client's request from a test or an evaluation in the `selections` view.
    """
    row = {
        "selection_id": summary["selection_id"],
        "created_at": datetime.now(timezone.utc).replace(tzinfo=None),  # UTC; the view reads it as TIMESTAMPTZ
        "index_version": summary["index_version"],
        "bundle_sha256": summary["bundle_sha256"],
        "mode": summary["mode"],
        "parameters": json.dumps(summary["parameters"], sort_keys=True),
        "scores": [float(s) for s in scores],
        "expert_weights": summary["expert_weights"],
        "manifest_location": summary["manifest_location"],
        "manifest_sha256": summary["manifest_sha256"],
        "n_selected": summary["rows"],
        "n_eligible": summary["n_eligible"],
        "counts_per_dataset": json.dumps(summary["counts_per_dataset"], sort_keys=True),
        "seconds": summary["seconds"],
        "origin": warehouse.check_origin(origin),
        "flow_run_id": None if flow_run_id is None else str(flow_run_id),
        "requester": requester,
        "datasets": None if datasets is None else [str(d) for d in datasets],
    }
    final = selections_dir(ws) / f"{summary['selection_id']}.parquet"
    with atomic_file(final) as tmp:
        pq.write_table(pa.Table.from_pylist([row], schema=warehouse.SELECTIONS_SCHEMA), tmp)
    return final
