"""Target tasks of a transfer evaluation: a client's few-shot labelled train set and a test set.

Built-in tasks (``TASKS``) are either held-out images of one source domain, never in the
indexed source, or cross-domain tasks built from collections the server has never seen
(``nds.corpus.tasks``: digits-m, lcd-digits, icons, nebulae), each naming the source domains a
person would call related. A user's own target is two labelled ImageFolders (``load_target_task``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nds.config import Workspace
from nds.corpus.tasks import OUTSIDE_TASKS, build_outside_task
from nds.errors import InvalidInputError


@dataclass(frozen=True)
class TaskSpec:
    """A built-in target task: held-out images of one source domain, or (``domain`` None) a
    cross-domain task of ``nds.corpus.tasks.OUTSIDE_TASKS`` under the same name."""

    domain: str | None
    #: Only these labels (None: every label with enough held-out images).
    classes: tuple[str, ...] | None = None
    description: str = ""


#: Built-in target tasks. Held-out images are never in the indexed source, so these are
#: new images of a known domain (letters: fonts the index has never seen).
TASKS: dict[str, TaskSpec] = {
    "digits": TaskSpec("mnist", description="handwritten digits (MNIST held out)"),
    "clothing": TaskSpec("fashion", description="Fashion-MNIST held out"),
    "letters": TaskSpec("glyphs", tuple(chr(c) for c in range(ord("A"), ord("Z") + 1)),
                        description="26 upper-case letters in held-out fonts"),
    "animals": TaskSpec("animals", description="animal silhouettes held out"),
    "emoji": TaskSpec("emoji", description="Noto emoji categories held out (colour)"),
    **{name: TaskSpec(None, description=t.description) for name, t in OUTSIDE_TASKS.items()},
}


class TargetTask(NamedTuple):
    """A target task. images: (n, 32, 32, 3) uint8; labels: (n,) str."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    name: str = "custom"
    #: The source domain the task comes from (None for a user's own data and cross-domain tasks).
    domain: str | None = None
    #: Source domains a person would call related to a cross-domain task (empty: none is).
    related: tuple[str, ...] = ()

    @property
    def related_domains(self) -> tuple[str, ...]:
        """The source domains whose share of a selection is its precision: ``related``, else the own domain."""
        return self.related or ((self.domain,) if self.domain else ())

    @property
    def domain_label(self) -> str | None:
        """What the results table's ``domain`` column shows: the own domain, else the related ones joined by +."""
        return self.domain or ("+".join(self.related) or None)


def build_target_task(ws: Workspace, name: str, *, shots: int = 10, seed: int = 0,
                      test_per_class: int = 50, max_classes: int | None = None) -> TargetTask:
    """Few-shot train set (``shots`` per class) and a disjoint test set from held-out images.

    Classes with fewer than ``shots + 1`` held-out images are left out; each class gets at
    most ``test_per_class`` test images. Same seed -> the same split.
    """
    from nds.corpus.read import load_catalog, load_images_at

    if name not in TASKS:
        raise InvalidInputError(f"unknown target task {name!r}; choose one of: {', '.join(TASKS)} "
                                "(or give your own --train/--test ImageFolders)")
    if shots < 1 or test_per_class < 1:
        raise InvalidInputError(f"shots and test_per_class must be >= 1, got {shots} and {test_per_class}")
    spec = TASKS[name]
    if spec.domain is None:
        return _outside_task(ws, name, shots=shots, seed=seed, test_per_class=test_per_class)
    cat = load_catalog(ws.data_dir, split="holdout")
    ds = np.asarray(cat.column("dataset").to_pylist(), dtype=object)
    labels = np.asarray(cat.column("label").to_pylist(), dtype=object)
    idx = np.flatnonzero(ds == spec.domain)
    if spec.classes is not None:
        idx = idx[np.isin(labels[idx], list(spec.classes))]
    classes = sorted({c for c in labels[idx] if int((labels[idx] == c).sum()) > shots})
    if max_classes is not None:
        counts = {c: int((labels[idx] == c).sum()) for c in classes}
        classes = sorted(sorted(classes, key=lambda c: (-counts[c], c))[:max_classes])
    if len(classes) < 2:
        raise InvalidInputError(f"task {name!r}: fewer than 2 classes of {spec.domain} have more than {shots} "
                                "held-out images in this corpus; lower shots or use a larger corpus profile")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in classes:
        members = rng.permutation(idx[labels[idx] == c])
        train.extend(members[:shots].tolist())
        test.extend(members[shots:shots + test_per_class].tolist())
    uris = np.asarray(cat.column("uri").to_pylist(), dtype=object)
    train, test = np.asarray(train), np.asarray(test)
    return TargetTask(
        load_images_at(ws.data_dir, uris[train].tolist()), labels[train].astype(str),
        load_images_at(ws.data_dir, uris[test].tolist()), labels[test].astype(str),
        name, spec.domain,
    )


def _outside_task(ws: Workspace, name: str, *, shots: int, seed: int, test_per_class: int) -> TargetTask:
    """The first ``shots`` images of each class train, the next ``test_per_class`` test; classes
    with no image left to test on are dropped."""
    images, labels = build_outside_task(ws, name, per_class=shots + test_per_class, seed=seed)
    train, test = [], []
    for c in sorted(set(labels)):
        members = np.flatnonzero(labels == c)
        if len(members) > shots:
            train.extend(members[:shots].tolist())
            test.extend(members[shots:].tolist())
    if len(set(labels[train])) < 2:
        raise InvalidInputError(f"task {name!r}: fewer than 2 classes have more than {shots} images; lower shots")
    train, test = np.asarray(train), np.asarray(test)
    return TargetTask(images[train], labels[train], images[test], labels[test], name, None,
                      OUTSIDE_TASKS[name].related)


def load_target_task(train_dir: Path, test_dir: Path, *, name: str = "custom") -> TargetTask:
    """A user's own target: two labelled ImageFolders (or .npz files) of train and test images."""
    from nds.client.images import load_client_images

    train = load_client_images(Path(train_dir), progress=False)
    test = load_client_images(Path(test_dir), progress=False)
    for what, data in (("train", train), ("test", test)):
        if data.labels is None or len(data.class_names) < 2:
            raise InvalidInputError(f"the {what} set must be labelled with >= 2 classes (one sub-folder per class)")
    unknown = sorted(set(test.class_names) - set(train.class_names))
    if unknown:
        raise InvalidInputError(f"test classes {unknown[:5]} have no training images: give every test class some")
    return TargetTask(train.images, train.labels.astype(str), test.images, test.labels.astype(str), name, None)
