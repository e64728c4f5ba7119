"""Client target tasks as ImageFolders: held-out corpus images (never in the indexed source), or a
cross-domain task built from a collection outside the source (``nds.corpus.tasks``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from nds.client.download import image_folder_writer
from nds.config import Workspace
from nds.corpus.read import image_sha256, load_catalog, load_images_at
from nds.corpus.tasks import OUTSIDE_TASKS, build_outside_task
from nds.errors import NotFoundError

log = logging.getLogger(__name__)


def export_holdout(ws: Workspace, dataset: str, out_dir: Path, *, per_class: int = 20, seed: int = 0,
                   max_classes: int | None = None) -> dict:
    """Write up to `per_class` held-out images per label of `dataset` as an ImageFolder of PNGs.

    `dataset` may also name a cross-domain task (digits-m, lcd-digits, icons, nebulae): its
    images, built for `seed`, are written the same way (file names: class, index, content hash).
    """
    if dataset in OUTSIDE_TASKS:
        return _export_outside(ws, dataset, Path(out_dir), per_class=per_class, seed=seed)
    cat = load_catalog(ws.data_dir, split="holdout")
    ds = np.asarray(cat.column("dataset").to_pylist(), dtype=object)
    known = sorted(set(ds))
    if dataset not in known:
        raise NotFoundError(f"no held-out images for dataset {dataset!r}; choose one of {known} "
                            f"or a cross-domain task: {', '.join(OUTSIDE_TASKS)}")
    idx = np.flatnonzero(ds == dataset)
    labels = np.asarray(cat.column("label").to_pylist(), dtype=object)[idx]
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    if max_classes is not None:
        counts = {c: int((labels == c).sum()) for c in classes}
        classes = sorted(sorted(classes, key=lambda c: -counts[c])[:max_classes])
    chosen = []
    for c in classes:
        members = idx[labels == c]
        chosen.extend(rng.permutation(members)[:per_class].tolist())
    chosen = np.asarray(sorted(chosen))
    if len(chosen) == 0:
        raise NotFoundError(f"dataset {dataset!r} has no held-out images in this corpus")
    images = load_images_at(ws.data_dir, cat.column("uri").take(chosen).to_pylist())
    ids = cat.column("sample_id").take(chosen).to_pylist()
    labs = cat.column("label").take(chosen).to_pylist()
    with image_folder_writer(Path(out_dir)) as write:
        for img, sid, lab in zip(images, ids, labs):
            write(img, (lab,), sid)
    return {"dataset": dataset, "images": len(chosen), "classes": len(classes), "out_dir": str(out_dir)}


def _export_outside(ws: Workspace, name: str, out_dir: Path, *, per_class: int, seed: int) -> dict:
    images, labels = build_outside_task(ws, name, per_class=per_class, seed=seed)
    with image_folder_writer(out_dir) as write:
        for i, (img, lab) in enumerate(zip(images, labels)):
            write(img, (str(lab),), f"{name}-{lab}-{i:05d}-{image_sha256(img)[:12]}")
    return {"dataset": name, "images": len(images), "classes": len(set(labels.tolist())), "out_dir": str(out_dir)}
