"""Manifest: build from a catalog, atomic write, checksum, load, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nds.errors import NDSError
from nds.formats import manifest as manifest_mod
from nds.formats.manifest import MANIFEST_COLUMNS, build_manifest, load_manifest, write_manifest
from nds.select.probability import compute_expert_weights, compute_sample_probabilities
from nds.select.samplers import select_samples

EXTRA = {"index_version": "v-test", "parameters": {"temperature": 0.5, "budget": 4, "seed": 7}}


def _catalog(n: int = 10) -> pa.Table:
    return pa.table({
        "sample_id": [f"s{i:03d}" for i in range(n)],
        "dataset": ["cifar" if i % 3 else "svhn" for i in range(n)],
        "uri": [f"images/{i}.png" for i in range(n)],
        "label": [i % 4 for i in range(n)],
        "split": ["train"] * n,
        "sha256": [f"{i:064x}" for i in range(n)],
    })


def _selection():
    catalog = _catalog()
    assignments = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 0])
    p = compute_sample_probabilities(assignments, compute_expert_weights([1.0, 0.0, 2.0], temperature=1.0))
    indices = select_samples(p, 4, seed=7)
    return catalog, indices, p, assignments


def test_build_manifest_tiny_exact():
    catalog = _catalog(4)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    m = build_manifest(catalog, np.array([3, 0]), p, np.array([0, 1, 1, 2]))
    assert m.column_names == list(MANIFEST_COLUMNS)
    assert m.to_pydict() == {
        "sample_id": ["s003", "s000"], "dataset": ["svhn", "svhn"], "uri": ["images/3.png", "images/0.png"],
        "label": [3, 0], "probability": [0.4, 0.1], "expert": [2, 0], "rank": [0, 1],
        "sha256": [f"{3:064x}", f"{0:064x}"],
    }
    assert m.column_names[-1] == "sha256"  # last: readers that index columns by position keep working


@pytest.mark.parametrize(
    "indices, n_p, fragment",
    [(np.array([0, 10]), 10, r"\[0, 10\)"), (np.array([1, 1]), 10, "duplicates"),
     (np.array([0.0]), 10, "integer"), (np.array([0]), 9, "same samples")],
)
def test_build_manifest_rejects_bad_input(indices, n_p, fragment):
    with pytest.raises(NDSError, match=fragment):
        build_manifest(_catalog(), indices, np.full(n_p, 1 / n_p), np.zeros(n_p, dtype=int))


@pytest.mark.parametrize("column", ["uri", "sha256"])
def test_build_manifest_rejects_catalog_without_columns(column):
    with pytest.raises(NDSError, match=column):
        build_manifest(_catalog().drop([column]), np.array([0]), np.full(10, 0.1), np.zeros(10, dtype=int))


def test_sha256_survives_every_form(tmp_path):
    m = build_manifest(*_selection())
    write_manifest(m, tmp_path / "sel", summary_extra=EXTRA)
    header = (tmp_path / "sel" / "manifest.csv").read_text().splitlines()[0]
    assert header.endswith('"rank","sha256"')
    for form in ("", "manifest.parquet", "manifest.csv"):
        assert load_manifest(tmp_path / "sel" / form).column("sha256").to_pylist() == m.column("sha256").to_pylist()


def test_manifest_without_sha256_still_loads(tmp_path):
    """A manifest written before the column existed loads; its hashes are null (downloads go unverified)."""
    old = build_manifest(*_selection()).drop(["sha256"])
    (tmp_path / "old").mkdir()
    pq.write_table(old, tmp_path / "old" / "manifest.parquet")
    table = load_manifest(tmp_path / "old")
    assert table.column_names == list(MANIFEST_COLUMNS)
    assert table.column("sha256").null_count == table.num_rows == 4


def test_round_trip_and_summary(tmp_path):
    m = build_manifest(*_selection())
    out = tmp_path / "sel"
    summary = write_manifest(m, out, summary_extra=EXTRA)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv", "manifest.parquet", "summary.json"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["rows"] == 4 and summary["index_version"] == "v-test"
    assert sum(summary["counts_per_dataset"].values()) == 4
    assert sum(summary["counts_per_expert"].values()) == 4
    assert load_manifest(out).equals(m)
    assert load_manifest(out / "manifest.parquet").equals(m)
    assert load_manifest(out / "manifest.csv").equals(m)


def test_checksum_is_stable_for_same_inputs(tmp_path):
    first = write_manifest(build_manifest(*_selection()), tmp_path / "a", summary_extra=EXTRA)
    second = write_manifest(build_manifest(*_selection()), tmp_path / "b", summary_extra={})
    assert first["manifest_sha256"] == second["manifest_sha256"]
    assert len(first["manifest_sha256"]) == 64


def test_modified_manifest_is_detected(tmp_path):
    out = tmp_path / "sel"
    write_manifest(build_manifest(*_selection()), out, summary_extra=EXTRA)
    csv = out / "manifest.csv"
    csv.write_text(csv.read_text().replace("images/", "elsewhere/"))
    with pytest.raises(NDSError, match="modified after it was written"):
        load_manifest(out)
    with pytest.raises(NDSError, match="modified after it was written"):
        load_manifest(csv)


def test_refuses_non_empty_out_dir_unless_overwrite(tmp_path):
    out = tmp_path / "sel"
    write_manifest(build_manifest(*_selection()), out, summary_extra=EXTRA)
    with pytest.raises(NDSError, match="already holds a selection"):
        write_manifest(build_manifest(*_selection()), out, summary_extra=EXTRA)
    catalog, _, p, a = _selection()
    smaller = build_manifest(catalog, np.array([5]), p, a)
    summary = write_manifest(smaller, out, summary_extra=EXTRA, overwrite=True)
    assert summary["rows"] == 1 and load_manifest(out).num_rows == 1
    assert sorted(q.name for q in tmp_path.iterdir()) == ["sel"]


def test_empty_existing_out_dir_is_used(tmp_path):
    out = tmp_path / "sel"
    out.mkdir()
    write_manifest(build_manifest(*_selection()), out, summary_extra=EXTRA)
    assert (out / "summary.json").exists()


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_csv(table, path):
        path.write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(manifest_mod, "_write_csv", broken_csv)
    out = tmp_path / "sel"
    with pytest.raises(OSError, match="disk full"):
        write_manifest(build_manifest(*_selection()), out, summary_extra=EXTRA)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_extra_leaves_nothing(tmp_path):
    with pytest.raises(NDSError, match="JSON"):
        write_manifest(build_manifest(*_selection()), tmp_path / "sel", summary_extra={"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_reserved_summary_keys_refused(tmp_path):
    with pytest.raises(NDSError, match="manifest_sha256"):
        write_manifest(build_manifest(*_selection()), tmp_path / "sel", summary_extra={"manifest_sha256": "x"})


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/etc/nds-escape"])
def test_path_traversal_refused(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(NDSError, match="root|inside|'\\.\\.'"):
        write_manifest(build_manifest(*_selection()), Path(name), summary_extra=EXTRA, root=root)
    assert list(root.iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_symlink_escape_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(NDSError, match="outside"):
        write_manifest(build_manifest(*_selection()), root / "link" / "sel", summary_extra=EXTRA, root=root)


def test_relative_out_dir_inside_root(tmp_path):
    summary = write_manifest(build_manifest(*_selection()), Path("runs/sel"), summary_extra=EXTRA, root=tmp_path)
    assert summary["rows"] == 4 and (tmp_path / "runs" / "sel" / "manifest.parquet").exists()


def test_load_manifest_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(NDSError, match="no manifest"):
        load_manifest(tmp_path / "nothing")
    other = tmp_path / "notes.txt"
    other.write_text("hi")
    with pytest.raises(NDSError, match="not a manifest"):
        load_manifest(other)


def test_deferred_parquet_is_made_on_demand_with_the_same_bytes(tmp_path):
    m = build_manifest(*_selection())
    eager = write_manifest(m, tmp_path / "eager", summary_extra=EXTRA)
    lazy = write_manifest(m, tmp_path / "lazy", summary_extra=EXTRA, parquet=False)
    folder = tmp_path / "lazy"
    assert sorted(p.name for p in folder.iterdir()) == [manifest_mod.DEFERRED_NAME, "manifest.csv", "summary.json"]
    assert "parquet_sha256" not in lazy and lazy["manifest_sha256"] == eager["manifest_sha256"]
    assert load_manifest(folder).equals(m)  # the CSV form, checked, until the Parquet exists
    assert manifest_mod.read_table(folder).equals(m)
    path = manifest_mod.write_parquet_form(folder)
    assert path.read_bytes() == (tmp_path / "eager" / "manifest.parquet").read_bytes()
    assert json.loads((folder / "summary.json").read_text())["parquet_sha256"] == eager["parquet_sha256"]
    assert manifest_mod.write_parquet_form(folder) == path  # idempotent
    assert load_manifest(folder).equals(m)
