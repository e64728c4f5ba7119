"""Target tasks: built-in held-out tasks and their input checks."""

from __future__ import annotations

import pytest

from nds.errors import NDSError
from nds.evaluate.tasks import build_target_task


def test_unknown_task_lists_the_valid_ones(tmp_path):
    from nds.config import Workspace

    with pytest.raises(NDSError, match="digits.*clothing.*letters"):
        build_target_task(Workspace(tmp_path), "cifar")


# --------------------------------------------------------------------------- cross-domain tasks

CROSS = ("digits-m", "lcd-digits", "icons", "nebulae")
EXPECTED_CLASSES = {
    "digits-m": [str(d) for d in range(10)], "lcd-digits": [str(d) for d in range(10)],
    "icons": ["actions", "apps", "categories", "devices", "emblems", "emotes", "mimetypes", "places", "status"],
    "nebulae": ["cluster", "galaxy", "nebula"],
}


@pytest.fixture(scope="module")
def corpus_ws(tiny_corpus_dir):
    from nds.config import Workspace

    return Workspace(tiny_corpus_dir.parent)


@pytest.mark.parametrize("name", CROSS)
def test_cross_domain_tasks_are_deterministic_with_the_right_classes(corpus_ws, name):
    import numpy as np

    from nds.corpus.tasks import OUTSIDE_TASKS

    task = build_target_task(corpus_ws, name, shots=1, seed=0, test_per_class=1)
    again = build_target_task(corpus_ws, name, shots=1, seed=0, test_per_class=1)
    other = build_target_task(corpus_ws, name, shots=1, seed=1, test_per_class=1)
    assert np.array_equal(task.train_images, again.train_images) and np.array_equal(task.test_images, again.test_images)
    assert not np.array_equal(task.train_images, other.train_images)
    assert task.train_images.dtype == np.uint8 and task.train_images.shape[1:] == (32, 32, 3)
    assert sorted(set(task.train_labels)) == sorted(set(task.test_labels)) == EXPECTED_CLASSES[name]
    assert (np.unique(task.train_labels, return_counts=True)[1] == 1).all()
    assert task.domain is None and task.related == OUTSIDE_TASKS[name].related
    assert task.related_domains == task.related and task.domain_label == ("+".join(task.related) or None)


@pytest.mark.parametrize("name", CROSS)
def test_cross_domain_images_are_not_in_the_source(corpus_ws, name):
    from nds.corpus.read import image_sha256, load_catalog

    source = set(load_catalog(corpus_ws.data_dir, split=None).column("sha256").to_pylist())
    task = build_target_task(corpus_ws, name, shots=1, seed=0, test_per_class=1)
    hashes = {image_sha256(im) for im in [*task.train_images, *task.test_images]}
    assert not hashes & source  # not a single image of the corpus, source or held out


def test_cross_domain_export_writes_an_image_folder(corpus_ws, tmp_path):
    from nds.client.images import load_client_images
    from nds.corpus.holdout import export_holdout

    info = export_holdout(corpus_ws, "lcd-digits", tmp_path / "lcd", per_class=2, seed=0)
    assert info == {"dataset": "lcd-digits", "images": 20, "classes": 10, "out_dir": str(tmp_path / "lcd")}
    data = load_client_images(tmp_path / "lcd", progress=False)
    assert len(data) == 20 and data.class_names == [str(d) for d in range(10)]


def test_a_missing_package_names_the_install_command(monkeypatch, corpus_ws):
    from pathlib import Path

    from nds.corpus.tasks import files

    monkeypatch.setattr(files, "STELLARIUM_DIR", Path("/nonexistent/stellarium"))
    with pytest.raises(NDSError, match="apt-get install stellarium-data"):
        build_target_task(corpus_ws, "nebulae", shots=2, seed=0)
