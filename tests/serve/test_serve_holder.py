"""The index holder: a memory-mapped snapshot per version, atomic swaps, a rebuild half-way is not served;
and run_selection's O(K + B) path for an already-loaded index gives the manifest the O(N) path gives."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from servehelpers import synthetic_scores, write_synthetic_index

from nds._io import atomic_dir
from nds.config import Workspace
from nds.errors import NotFoundError
from nds.select.service import SelectRequest, run_selection
from nds.serve.holder import IndexHolder, IndexInTransition


def test_snapshot_is_memory_mapped_and_reused(tmp_path):
    ws = Workspace((tmp_path / "ws").resolve())
    info = write_synthetic_index(ws.root, n=5000, k=5)
    holder = IndexHolder(ws, tmp_path / "state", poll_s=0)
    loaded = holder.current()
    assert loaded.version == info["index_version"] and loaded.index.k == 5
    assert loaded.index.catalog.column("sample_id").num_chunks == 1  # `take` reads only the drawn rows
    # few distinct values: stored as small integers; manifests decode them (same bytes, see below)
    assert [str(loaded.index.catalog.schema.field(c).type) for c in ("dataset", "label", "uri")] == [
        "dictionary<values=string, indices=int32, ordered=0>"] * 2 + ["string"]
    assert isinstance(loaded.index.assignments, np.memmap) and isinstance(loaded.index.layout[0], np.memmap)
    ready = next((tmp_path / "state" / "index-cache").glob("*/ready.json"))
    stamp = ready.stat().st_mtime_ns
    again = IndexHolder(ws, tmp_path / "state", poll_s=0).current()  # a restart opens the snapshot
    assert ready.stat().st_mtime_ns == stamp and again.key == loaded.key
    assert (loaded.bundle_dir / "bundle.json").read_bytes() == (ws.stage_dir("experts") / "bundle.json").read_bytes()


def test_new_version_swaps_in_and_half_a_rebuild_does_not(tmp_path):
    ws = Workspace((tmp_path / "ws").resolve())
    v1 = write_synthetic_index(ws.root, n=3000, k=4, version="v1", prefix="a")
    other = Workspace((tmp_path / "other").resolve())
    write_synthetic_index(other.root, n=4000, k=6, version="v2", prefix="b")
    holder = IndexHolder(ws, tmp_path / "state", poll_s=0)
    first = holder.current()
    # a rebuild half-way: new catalog and bundle, old weights -> v1 stays in service
    for stage in ("extract", "experts"):
        with atomic_dir(ws.stage_dir(stage)) as tmp:
            shutil.copytree(other.stage_dir(stage), tmp, dirs_exist_ok=True)
    assert holder.refresh() is first and holder.current().version == "v1"
    with pytest.raises(IndexInTransition):
        IndexHolder(ws, tmp_path / "state2", poll_s=0).current()  # nothing to fall back on: a clear error
    with atomic_dir(ws.stage_dir("weights")) as tmp:
        shutil.copytree(other.stage_dir("weights"), tmp, dirs_exist_ok=True)
    second = holder.refresh()
    assert second.version == "v2" and second.index.k == 6
    # the request that took v1 before the swap still reads v1, wholly
    assert first.index.catalog.column("sample_id")[0].as_py().startswith("a")
    assert first.index.catalog.num_rows == 3000 and int(first.index.layout[1][-1]) == 3000
    summary = run_selection(ws, SelectRequest(scores=synthetic_scores(v1), budget=10), index=first.index,
                            out_dir=tmp_path / "old")
    assert summary["index_version"] == "v1"


def test_no_index_is_one_clear_error(tmp_path):
    with pytest.raises(NotFoundError, match="build the index first"):
        IndexHolder(Workspace(tmp_path.resolve()), tmp_path / "state", poll_s=0).current()


@pytest.mark.parametrize("budget", [1, 37, 0.2])
def test_fast_path_equals_the_full_probability_path(tmp_path, budget):
    """No filter: O(K + B) from the loaded layout; a filter naming every dataset: the O(N) mask and p(x).
    Same law, same numbers: the manifests are byte-identical, whether the index is passed in or read."""
    ws = Workspace((tmp_path / "ws").resolve())
    info = write_synthetic_index(ws.root, n=6000, k=9)
    loaded = IndexHolder(ws, tmp_path / "state", poll_s=0).current()
    scores = synthetic_scores(info, favour=4)
    scores["scores"] = [0.2 + 0.05 * k for k in range(9)]
    fast = run_selection(ws, SelectRequest(scores=scores, budget=budget, seed=3, temperature=0.1),
                         out_dir=tmp_path / "fast", index=loaded.index)
    full = run_selection(ws, SelectRequest(scores=scores, budget=budget, seed=3, temperature=0.1,
                                           datasets=info["datasets"]), out_dir=tmp_path / "full")
    assert fast["manifest_sha256"] == full["manifest_sha256"] and fast["rows"] == full["rows"]
    for name in ("manifest.csv", "manifest.parquet"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    with pytest.raises(Exception, match="exceeds"):
        run_selection(ws, SelectRequest(scores=scores, budget=6001), out_dir=tmp_path / "x", index=loaded.index)
    assert not (tmp_path / "x").exists()
