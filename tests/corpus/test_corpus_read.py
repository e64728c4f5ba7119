"""nds.corpus.read: the catalog and image readers of a built corpus (the tiny one, see corpusfixtures.py),
and of a corpus in the array layout built before packaged datasets were sources (`legacy_tiny`)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nds.config import IMAGE_SIZE
from nds.corpus.build import DATASETS
from nds.corpus.read import (
    CATALOG_COLUMNS,
    image_sha256,
    iter_image_batches,
    load_catalog,
    load_images,
    load_images_at,
    split_uri,
)
from nds.errors import InvalidInputError, NDSError, NotFoundError

from corpusfixtures import legacy_tiny, sources_env, tiny  # noqa: F401  (fixtures)


def _col(table, name):
    return table.column(name).to_pylist()


def _sha(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_uri_array_and_row_point_at_the_hashed_image(legacy_tiny):
    ws, catalog = legacy_tiny
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


def test_iter_image_batches_matches_load_images(legacy_tiny):
    ws, catalog = legacy_tiny
    batches = list(iter_image_batches(ws.data_dir, catalog, 333))
    assert [len(b) for b in batches[:-1]] == [333] * (len(batches) - 1)
    streamed = np.concatenate(batches)
    direct = load_images(ws.data_dir, _col(catalog, "array"), np.asarray(_col(catalog, "row")))
    assert np.array_equal(streamed, direct)
    with pytest.raises(NDSError, match="batch_size"):
        next(iter_image_batches(ws.data_dir, catalog, 0))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_load_images_keeps_request_order(legacy_tiny, data):
    ws, catalog = legacy_tiny
    picks = data.draw(st.lists(st.integers(0, catalog.num_rows - 1), max_size=60))
    arrays = [_col(catalog, "array")[i] for i in picks]
    rows = np.asarray([_col(catalog, "row")[i] for i in picks], dtype=np.int64)
    images = load_images(ws.data_dir, arrays, rows)
    assert images.shape == (len(picks), IMAGE_SIZE, IMAGE_SIZE, 3)
    expected = [np.load(ws.data_dir / a, mmap_mode="r")[r] for a, r in zip(arrays, rows)]
    assert all(np.array_equal(im, ex) for im, ex in zip(images, expected))


def test_load_images_rejects_bad_rows(legacy_tiny):
    ws, _ = legacy_tiny
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


def test_catalog_is_readable_as_plain_parquet(tiny, legacy_tiny):
    ws, _, catalog = tiny
    for path in sorted((ws.data_dir / "sources").glob("*/catalog.parquet")):
        assert set(CATALOG_COLUMNS) - {"array", "row"} <= set(pq.read_schema(path).names)
    assert pq.read_schema(legacy_tiny[0].catalog_path).names == list(CATALOG_COLUMNS)


def test_packaged_uris_are_read_from_the_workspace_root(tiny, legacy_tiny, tmp_path, monkeypatch):
    """The packaged shards' uris are relative to the workspace, not to the current folder; the
    pixels are those of the legacy arrays built from the same packages."""
    from nds.corpus.read import resolve_uri

    ws, _, catalog = tiny
    monkeypatch.chdir(tmp_path)
    uris = _col(catalog, "uri")[::53]
    assert resolve_uri(ws.data_dir, uris[0]) == str(ws.root.absolute() / uris[0])
    assert resolve_uri(ws.data_dir, "s3://b/k.png") == "s3://b/k.png"
    legacy_ws, legacy = legacy_tiny
    assert np.array_equal(load_images_at(ws.data_dir, uris),
                          load_images_at(legacy_ws.data_dir, _col(legacy, "uri")[::53]))


# --- error kinds, uris and the shared image hash ---------------------------------------------


def test_missing_corpus_is_not_found_and_bad_requests_are_invalid(tmp_path, tiny):
    ws, _, _ = tiny
    with pytest.raises(NotFoundError):
        load_catalog(tmp_path)
    with pytest.raises(NotFoundError, match="is missing"):
        load_images(tmp_path, ["images/mnist.npy"], np.asarray([0]))
    with pytest.raises(InvalidInputError):
        load_catalog(ws.data_dir, split="train")


def test_split_uri_and_load_images_at(legacy_tiny):
    ws, catalog = legacy_tiny
    assert split_uri("data/images/mnist.npy#12") == ("images/mnist.npy", 12)
    assert split_uri("s3://bucket/p/images/mnist.npy#3") == ("s3://bucket/p/images/mnist.npy", 3)
    for bad in ("images/mnist.npy#1", "data/images/mnist.npy", "data/images/mnist.npy#x"):
        with pytest.raises(InvalidInputError, match="unsupported sample uri"):
            split_uri(bad)
    uris = _col(catalog, "uri")[::97]
    direct = load_images(ws.data_dir, _col(catalog, "array")[::97], np.asarray(_col(catalog, "row")[::97]))
    assert np.array_equal(load_images_at(ws.data_dir, uris), direct)


def test_image_sha256_is_the_catalog_hash(legacy_tiny):
    ws, catalog = legacy_tiny
    images = load_images(ws.data_dir, _col(catalog, "array")[:20], np.asarray(_col(catalog, "row")[:20]))
    assert [image_sha256(im) for im in images] == _col(catalog, "sha256")[:20]
    # Stored bytes, whatever the layout handed in.
    assert image_sha256(np.asfortranarray(images[0])) == _col(catalog, "sha256")[0]
