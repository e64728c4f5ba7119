"""Transfer evaluation: does pre-training on the NDS selection help a target task?

For a target task (a client's few-shot labelled train set and a test set) and a list of
budgets, each strategy picks source data, a small CNN is pre-trained on it with the source
labels (label space ``dataset:label``), fine-tuned on the client's train set and scored on
its test set:

- ``nds``: the real client path: rotation scores of the expert bundle on the client's TRAIN
  images (``nds.scoring``), then ``nds.selections.run_selection`` at the budget;
- ``uniform``: the same number of source samples drawn uniformly at random (seeded);
- ``all``: the whole indexed source (one budget: its size);
- ``none``: no pre-training (the fine-tuning recipe from a random initialisation).

Pre-training runs ``TrainConfig.pretrain_epochs`` passes over the selection, clamped to
[``pretrain_min_steps``, ``pretrain_steps``] optimisation steps (``pretrain_schedule``): every
strategy gets the same per-sample training (30 epochs) until the cap, so ``all`` is trained
properly (3,600 steps, ~20 epochs of the 22k-image ``small`` source) rather than starved, and
tiny selections get a floor of steps. With ``pretrain_epochs=None`` every selection gets
exactly ``pretrain_steps`` steps (equal compute whatever the budget). ``none`` and every
pre-trained model get the identical fine-tuning recipe.

Accuracy against budget is summarised per strategy by a least-squares line
``acc = a + b * log(budget)`` (``fit_log_linear``), which ``predict_budget`` inverts to
answer "what budget reaches accuracy X?" with a delta-method interval.

Pure library code: no Prefect import; the ``evaluate`` flow (``flows/evaluate.py``) and
``nds evaluate`` orchestrate it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from nds.config import Workspace
from nds.errors import NDSError

log = logging.getLogger(__name__)

STRATEGIES = ("nds", "uniform", "all", "none")
#: Strategies whose selection size is the requested budget (``all``/``none`` ignore it).
BUDGETED = ("nds", "uniform")
#: Torch threads while evaluating. Measured on the 2-core dev machine next to other jobs:
#: one thread trains this small CNN 4x faster per step than two (0.11 s vs 0.45 s for a
#: 128-image step), because the tiny convolutions do not amortise threading overhead.
TORCH_THREADS = 1
#: z for the two-sided 95 % interval of ``predict_budget``.
Z95 = 1.959963984540054


@dataclass(frozen=True)
class TaskSpec:
    """A built-in target task: held-out images of one source domain."""

    domain: str
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
}


class TrainConfig(BaseModel):
    """The pre-training and fine-tuning recipe (identical for every strategy)."""

    model_config = ConfigDict(extra="forbid")

    #: Tuned on the small index (seed-0 pilot, digits + letters, 5 % budgets; see
    #: benchmarks/transfer_eval.py). The old recipe (150 pre-training steps whatever the
    #: budget; 80 fine-tuning steps at lr 1e-3) put uniform/all BELOW none: fine-tuning at
    #: 1e-3 for 80 steps leaves a fresh head on 100 images far from converged (none: digits
    #: 0.43 -> 0.85 at 1e-2 x 300 steps), and < 1 epoch of the ~140-class source taught `all`
    #: little (all -> digits 0.84 / 0.85 / 0.86 at 300 / 600 / 1,200 steps). The 1,200-step
    #: cap still left `all` level with `none`; 3,600 steps put it +1.6 / +3.8 / +1.8 points
    #: above on digits / clothing / letters (benchmarks/results/transfer_eval/pilot_all_steps.md).
    #: Only `all` reaches the cap: selections up to 20 % of `small` stay below 1,200 steps.
    pretrain_epochs: float | None = Field(30.0, gt=0, description=(
        "Passes over the selection, clamped to [pretrain_min_steps, pretrain_steps] steps; "
        "None: exactly pretrain_steps whatever the budget."))
    pretrain_min_steps: int = Field(300, ge=1, description="Floor of pre-training steps (tiny selections).")
    pretrain_steps: int = Field(3600, ge=1, description="Cap of pre-training steps (the fixed count if pretrain_epochs is None).")
    pretrain_batch: int = Field(128, ge=2)
    pretrain_lr: float = Field(0.003, gt=0)
    #: 300 steps at 1e-2: `none` (from scratch) needs that many to converge (letters 0.89 at
    #: 150 steps, 0.97 at 300), and every strategy gets the same recipe.
    finetune_steps: int = Field(300, ge=1)
    finetune_batch: int = Field(64, ge=2)
    finetune_lr: float = Field(0.01, gt=0)
    #: "all": every layer (a pre-trained backbone at finetune_lr * finetune_backbone_lr_scale;
    #: from scratch every layer at finetune_lr); "last": head + last block only.
    finetune_mode: str = Field("all", pattern="^(all|last)$")
    finetune_backbone_lr_scale: float = Field(1 / 3, gt=0, le=1)
    width: int = Field(16, ge=4, description="Channels of the first block (then x2, x4, x8).")


def pretrain_schedule(n_images: int, config: TrainConfig) -> int:
    """Pre-training steps for a selection of ``n_images``: epochs clamped to [min, cap] steps."""
    if config.pretrain_epochs is None:
        return config.pretrain_steps
    steps = math.ceil(config.pretrain_epochs * n_images / config.pretrain_batch)
    return int(min(config.pretrain_steps, max(min(config.pretrain_min_steps, config.pretrain_steps), steps)))


class TargetTask(NamedTuple):
    """A target task. images: (n, 32, 32, 3) uint8; labels: (n,) str."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    name: str = "custom"
    #: The source domain the task comes from (None for a user's own data).
    domain: str | None = None


# --------------------------------------------------------------------------- target tasks


def build_target_task(ws: Workspace, name: str, *, shots: int = 10, seed: int = 0,
                      test_per_class: int = 50, max_classes: int | None = None) -> TargetTask:
    """Few-shot train set (``shots`` per class) and a disjoint test set from held-out images.

    Classes with fewer than ``shots + 1`` held-out images are left out; each class gets at
    most ``test_per_class`` test images. Same seed -> the same split.
    """
    from nds.corpus.build import load_catalog, load_images

    if name not in TASKS:
        raise NDSError(f"unknown target task {name!r}; choose one of: {', '.join(TASKS)} "
                       "(or give your own --train/--test ImageFolders)")
    if shots < 1 or test_per_class < 1:
        raise NDSError(f"shots and test_per_class must be >= 1, got {shots} and {test_per_class}")
    spec = TASKS[name]
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
        raise NDSError(f"task {name!r}: fewer than 2 classes of {spec.domain} have more than {shots} held-out "
                       "images in this corpus; lower shots or use a larger corpus profile")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in classes:
        members = rng.permutation(idx[labels[idx] == c])
        train.extend(members[:shots].tolist())
        test.extend(members[shots:shots + test_per_class].tolist())
    arrays = np.asarray(cat.column("array").to_pylist(), dtype=object)
    rows = np.asarray(cat.column("row").to_pylist(), dtype=np.int64)
    train, test = np.asarray(train), np.asarray(test)
    return TargetTask(
        load_images(ws.data_dir, arrays[train], rows[train]), labels[train].astype(str),
        load_images(ws.data_dir, arrays[test], rows[test]), labels[test].astype(str),
        name, spec.domain,
    )


def load_target_task(train_dir: Path, test_dir: Path, *, name: str = "custom") -> TargetTask:
    """A user's own target: two labelled ImageFolders (or .npz files) of train and test images."""
    from nds.client.images import load_client_images

    train = load_client_images(Path(train_dir), progress=False)
    test = load_client_images(Path(test_dir), progress=False)
    for what, data in (("train", train), ("test", test)):
        if data.labels is None or len(data.class_names) < 2:
            raise NDSError(f"the {what} set must be labelled with >= 2 classes (one sub-folder per class)")
    unknown = sorted(set(test.class_names) - set(train.class_names))
    if unknown:
        raise NDSError(f"test classes {unknown[:5]} have no training images: give every test class some")
    return TargetTask(train.images, train.labels.astype(str), test.images, test.labels.astype(str), name, None)


# --------------------------------------------------------------------------- source + selection


@dataclass
class SourcePool:
    """The indexed source as evaluation needs it: catalog rows in index order + images.

    images: (n, 32, 32, 3) uint8; labels: (n,) str ``dataset:label``; datasets: (n,) str.
    """

    index: Any  # nds.selections.Index
    images: np.ndarray
    labels: np.ndarray
    datasets: np.ndarray
    position: dict[str, int] = field(repr=False)

    @property
    def size(self) -> int:
        return len(self.labels)


def load_source_pool(ws: Workspace) -> SourcePool:
    from nds.corpus.build import load_images_at
    from nds.select.service import load_current_index

    index = load_current_index(ws)
    images = load_images_at(ws.data_dir, index.catalog.column("uri").to_pylist())
    datasets = np.asarray(index.catalog.column("dataset").to_pylist(), dtype=object)
    labels = np.asarray([f"{d}:{lab}" for d, lab in zip(datasets, index.catalog.column("label").to_pylist())])
    ids = index.catalog.column("sample_id").to_pylist()
    return SourcePool(index, images, labels, datasets.astype(str), {s: i for i, s in enumerate(ids)})


def resolve_budgets(budgets: Sequence[float], n_source: int) -> list[int]:
    """Counts (>= 1, whole) or fractions (0 < f < 1) of the source -> sorted distinct counts."""
    if not budgets:
        raise NDSError("give at least one budget (a count such as 2000 or a fraction such as 0.1)")
    out = []
    for b in budgets:
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b) or b <= 0:
            raise NDSError(f"budget {b!r} must be a positive count or a fraction in (0, 1)")
        if b < 1:
            out.append(max(1, int(round(b * n_source))))
        elif b != int(b):
            raise NDSError(f"budget {b} is neither a whole count nor a fraction below 1: use e.g. 500 or 0.1")
        elif b > n_source:
            raise NDSError(f"budget {int(b)} exceeds the {n_source} indexed source samples")
        else:
            out.append(int(b))
    return sorted(set(out))


def score_task(ws: Workspace, task: TargetTask, *, seed: int = 0, progress: bool = False) -> dict:
    """The client's scores.json content: rotation scores of the expert bundle on the TRAIN images."""
    from nds.client.images import SCORES_FORMAT, ClientData, load_scores
    from nds.client.scoring import score_experts

    data = ClientData(task.train_images, task.train_labels, sorted(set(task.train_labels)), [])
    result = score_experts(ws.stage_dir("experts"), data, mode="rotation", seed=seed, progress=progress)
    return load_scores({
        "format": SCORES_FORMAT, "index_version": result.bundle["index_version"],
        "bundle_sha256": result.bundle["bundle_sha256"], "mode": "rotation", "k": result.bundle["k"],
        "scores": [float(s) for s in result.scores],
    })


def select_for_strategy(ws: Workspace, pool: SourcePool, strategy: str, budget: int, *, seed: int,
                        scores: dict | None = None, temperature: float | None = None,
                        manifest_dir: Path | None = None) -> np.ndarray:
    """Positions into ``pool`` to pre-train on: (budget,) int64 (``all``: every row; ``none``: empty)."""
    if strategy not in SELECTORS:
        raise NDSError(f"unknown strategy {strategy!r}; choose from: {', '.join(SELECTORS)}")
    if strategy in BUDGETED and not 1 <= budget <= pool.size:
        raise NDSError(f"budget {budget} must be between 1 and the {pool.size} source samples")
    return SELECTORS[strategy](ws, pool, budget, seed=seed, scores=scores, temperature=temperature,
                               manifest_dir=manifest_dir)


def _select_nds(ws, pool, budget, *, seed, scores, temperature, manifest_dir) -> np.ndarray:
    from nds.select.service import DEFAULT_TEMPERATURE, SelectRequest, run_selection

    if scores is None:
        raise NDSError("strategy 'nds' needs the client's scores (score_task)")
    request = SelectRequest(scores=scores, budget=budget, seed=seed,
                            temperature=temperature or DEFAULT_TEMPERATURE)
    own_dir = manifest_dir is None
    out = Path(tempfile.mkdtemp(prefix="nds-eval-manifest-")) if own_dir else Path(manifest_dir)
    try:
        summary = run_selection(ws, request, out_dir=out)
        ids = pq.read_table(Path(summary["manifest_location"]) / "manifest.parquet",
                            columns=["sample_id"]).column("sample_id").to_pylist()
    finally:
        if own_dir:
            shutil.rmtree(out, ignore_errors=True)
    return np.asarray([pool.position[s] for s in ids], dtype=np.int64)


def _select_uniform(ws, pool, budget, *, seed, **_) -> np.ndarray:
    rng = np.random.default_rng([seed, budget])
    return np.sort(rng.choice(pool.size, size=budget, replace=False)).astype(np.int64)


def _select_all(ws, pool, budget, **_) -> np.ndarray:
    return np.arange(pool.size, dtype=np.int64)


def _select_none(ws, pool, budget, **_) -> np.ndarray:
    return np.empty(0, dtype=np.int64)


#: strategy -> selector(ws, pool, budget, *, seed, scores, temperature, manifest_dir) -> positions.
SELECTORS: dict[str, Callable[..., np.ndarray]] = {
    "nds": _select_nds, "uniform": _select_uniform, "all": _select_all, "none": _select_none,
}


def domain_precision(pool: SourcePool, positions: np.ndarray, domain: str | None) -> float | None:
    """Share of the selected samples from the target's own domain (None if unknown/empty)."""
    if domain is None or len(positions) == 0:
        return None
    return float(np.mean(pool.datasets[positions] == domain))


# --------------------------------------------------------------------------- model + training


def build_model(n_classes: int, *, width: int = 32):
    """A small CNN for 32x32 RGB (about 0.1M parameters at width 16).

    Four conv-BN-ReLU blocks, the last three strided (32 -> 4 px; strided convolutions are
    much cheaper than pooling on CPU), global average pooling and a linear head. ``features``
    and ``head`` are separate so fine-tuning can replace the head.
    """
    import torch.nn as nn

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.features = nn.Sequential(block(3, w, 1), block(w, 2 * w, 2), block(2 * w, 4 * w, 2),
                                          block(4 * w, 8 * w, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.feature_dim = 8 * w
            self.head = nn.Linear(8 * w, n_classes)

        def forward(self, x):
            return self.head(self.features(x))

    return SmallCNN()


def _augment(x, generator):
    """Random translation by up to 3 px (zero padding), per sample; no flips (digits, letters)."""
    import torch

    n = x.shape[0]
    pad = 3
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    size = x.shape[-1]
    ar = torch.arange(size)
    rows = (dy[:, None] + ar[None, :])[:, None, :, None].expand(n, x.shape[1], size, size + 2 * pad)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + ar[None, :])[:, None, None, :].expand(n, x.shape[1], size, size)
    return torch.gather(out, 3, cols)


def _train_loop(model, params, x, y, *, steps: int, batch: int, lr: float, seed: int, desc: str,
                progress: bool, weight_decay: float = 5e-4) -> float:
    """Adam with cosine decay for a fixed number of steps on (x: (n,3,32,32) float, y: (n,) long)."""
    import torch
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = len(y)
    batch = min(batch, n)
    perm, at = torch.randperm(n, generator=g), 0
    model.train()
    loss = float("nan")
    for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        if at + batch > n:
            perm, at = torch.randperm(n, generator=g), 0
        idx = perm[at:at + batch]
        at += batch
        out = model(_augment(x[idx], g))
        loss_t = loss_fn(out, y[idx])
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        opt.step()
        sched.step()
        loss = float(loss_t.detach())
    return loss


def pretrain(images: np.ndarray, labels: np.ndarray, *, config: TrainConfig | None = None, seed: int = 0,
             progress: bool = False):
    """Train a fresh ``build_model`` on ``images: (n, 32, 32, 3) uint8`` with ``labels: (n,) str``.

    ``pretrain_schedule(n, config)`` steps. Returns the model (its head is the source classifier).
    """
    import torch

    from nds.models.experts import preprocess

    config = config or TrainConfig()
    if len(images) < 2 or len(images) != len(labels):
        raise NDSError(f"pre-training needs >= 2 labelled images, got {len(images)} images, {len(labels)} labels")
    names, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    torch.manual_seed(seed)
    model = build_model(len(names), width=config.width)
    x, y = preprocess(images), torch.from_numpy(codes.astype(np.int64))
    loss = _train_loop(model, model.parameters(), x, y, steps=pretrain_schedule(len(images), config),
                       batch=config.pretrain_batch,
                       lr=config.pretrain_lr, seed=seed, desc=f"pre-train ({len(images)} images)", progress=progress)
    log.debug("pre-trained on %d images, %d classes: final loss %.3f", len(images), len(names), loss)
    return model


def finetune_and_test(model, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                      test_labels: np.ndarray, *, config: TrainConfig | None = None, seed: int = 0,
                      progress: bool = False) -> float:
    """Replace the head, fine-tune on the train set, return test accuracy in [0, 1].

    ``model``: a pre-trained ``build_model`` (not modified: a copy is trained) or None for
    training from scratch. images: (n, 32, 32, 3) uint8; labels: (n,) str.
    """
    import torch

    from nds.models.experts import preprocess

    config = config or TrainConfig()
    names, codes = np.unique(np.asarray(train_labels).astype(str), return_inverse=True)
    if len(names) < 2:
        raise NDSError("fine-tuning needs >= 2 classes in the train set")
    lookup = {c: i for i, c in enumerate(names)}
    test_labels = np.asarray(test_labels).astype(str)
    if len(test_labels) == 0 or not set(test_labels) <= set(lookup):
        raise NDSError("the test set must be non-empty and use only classes of the train set")
    torch.manual_seed(seed)
    if model is None:
        net = build_model(len(names), width=config.width)
        params, scratch = list(net.parameters()), True
    else:
        net = copy.deepcopy(model)
        net.head = torch.nn.Linear(net.feature_dim, len(names))
        scratch = False
    if scratch or config.finetune_mode == "all":
        backbone = [p for p in net.features.parameters()]
        # From scratch everything learns at full rate; pre-trained features move more slowly.
        params = [{"params": backbone, "lr": config.finetune_lr * (1.0 if scratch else config.finetune_backbone_lr_scale)},
                  {"params": net.head.parameters(), "lr": config.finetune_lr}]
    else:
        last = net.features[3]
        for p in net.features.parameters():
            p.requires_grad_(False)
        for p in last.parameters():
            p.requires_grad_(True)
        params = [{"params": last.parameters()}, {"params": net.head.parameters()}]
    x, y = preprocess(train_images), torch.from_numpy(codes.astype(np.int64))
    _train_loop(net, params, x, y, steps=config.finetune_steps, batch=config.finetune_batch,
                lr=config.finetune_lr, seed=seed + 1, desc="fine-tune", progress=progress)
    net.eval()
    correct = 0
    with torch.inference_mode():
        for s in range(0, len(test_images), 512):
            pred = net(preprocess(test_images[s:s + 512])).argmax(1).numpy()
            correct += int((names[pred] == test_labels[s:s + 512]).sum())
    return correct / len(test_labels)


# --------------------------------------------------------------------------- fit + inverse


@dataclass(frozen=True)
class LogLinearFit:
    """acc = a + b * log(budget), least squares. Unpacks as (a, b, se_a, se_b).

    ``cov_ab`` is the covariance of the two estimates (needed for the budget interval);
    standard errors are NaN with fewer than 3 points.
    """

    a: float
    b: float
    se_a: float
    se_b: float
    cov_ab: float = 0.0
    n_points: int = 0
    budget_range: tuple[float, float] = (math.nan, math.nan)

    def __iter__(self):
        return iter((self.a, self.b, self.se_a, self.se_b))

    def predict(self, budget: float) -> float:
        return self.a + self.b * math.log(budget)


def fit_log_linear(budgets: Sequence[float], accs: Sequence[float]) -> LogLinearFit:
    """Least-squares ``acc = a + b log(budget)`` over paired points (repeat budgets for seeds)."""
    x = np.asarray(budgets, dtype=np.float64)
    y = np.asarray(accs, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise NDSError(f"budgets and accuracies must be 1-d and of equal length, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.any(x <= 0):
        raise NDSError("budgets must be positive and finite, accuracies finite")
    lx = np.log(x)
    if len(np.unique(lx)) < 2:
        raise NDSError("a log-linear fit needs at least 2 distinct budgets")
    design = np.column_stack([np.ones_like(lx), lx])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    n = len(y)
    if n > 2:
        resid = y - design @ coef
        sigma2 = float(resid @ resid) / (n - 2)
        cov = sigma2 * np.linalg.inv(design.T @ design)
        se_a, se_b, cov_ab = math.sqrt(cov[0, 0]), math.sqrt(cov[1, 1]), float(cov[0, 1])
    else:
        se_a = se_b = cov_ab = math.nan
    return LogLinearFit(float(coef[0]), float(coef[1]), se_a, se_b, cov_ab, n, (float(x.min()), float(x.max())))


def predict_budget(fit: LogLinearFit, target_acc: float, *, max_budget: float | None = None,
                   z: float = Z95) -> tuple[float, float, float]:
    """Budget at which the fitted line reaches ``target_acc``, with a delta-method interval.

    Returns (budget, low, high). ``budget`` is ``inf`` when the target is out of reach: the
    line does not rise (b <= 0) or needs more than ``max_budget`` samples. The interval is
    exp(log B -+ z * se(log B)), se from the fit's covariance (NaN if the fit has none).
    """
    if not 0 < target_acc <= 1:
        raise NDSError(f"target accuracy must be in (0, 1], got {target_acc}")
    a, b = fit.a, fit.b
    if b <= 0:
        return math.inf, math.inf, math.inf
    log_b = (target_acc - a) / b
    # d logB / da = -1/b ; d logB / db = -(X - a) / b^2
    ga, gb = -1.0 / b, -(target_acc - a) / b**2
    var = ga * ga * fit.se_a**2 + gb * gb * fit.se_b**2 + 2 * ga * gb * fit.cov_ab
    se = math.sqrt(var) if var >= 0 else math.nan
    budget = math.exp(min(log_b, 700.0))
    low = math.exp(min(log_b - z * se, 700.0)) if math.isfinite(se) else math.nan
    high = math.exp(min(log_b + z * se, 700.0)) if math.isfinite(se) else math.nan
    if max_budget is not None and budget > max_budget:
        return math.inf, low, high
    return budget, low, high


# --------------------------------------------------------------------------- the evaluation


RESULT_COLUMNS = ("task", "domain", "strategy", "budget", "budget_fraction", "seed", "accuracy",
                  "domain_precision", "n_pretrain", "pretrain_seconds", "finetune_seconds")


def _selection_key(positions: np.ndarray, seed: int, config: TrainConfig) -> str:
    h = hashlib.sha256(np.ascontiguousarray(positions).tobytes())
    h.update(json.dumps([seed, config.model_dump()], sort_keys=True).encode())
    return h.hexdigest()


def evaluate(ws: Workspace, tasks: Sequence[str | TargetTask], budgets: Sequence[float], *,
             strategies: Sequence[str] = STRATEGIES, seeds: Sequence[int] = (0, 1, 2), shots: int = 10,
             test_per_class: int = 50, config: TrainConfig | None = None, temperature: float | None = None,
             work_dir: Path | None = None, progress: bool = True) -> pa.Table:
    """Run every (task, strategy, budget, seed); one row per run (``RESULT_COLUMNS``).

    ``tasks``: built-in names (``TASKS``; rebuilt per seed, so the few-shot split varies
    with the seed) or ready ``TargetTask``s. ``budgets``: counts or fractions of the source.
    ``all`` gets one row per seed at the source size, ``none`` one at budget 0. A model
    pre-trained on the same rows with the same seed is reused (``uniform`` and ``all`` do
    not depend on the task), so several tasks cost less than their sum.
    ``work_dir`` keeps the ``nds`` manifests (default: a temporary folder, removed).
    """
    from nds.models.experts import torch_threads

    with torch_threads(TORCH_THREADS):
        return _evaluate(ws, tasks, budgets, strategies=strategies, seeds=seeds, shots=shots,
                         test_per_class=test_per_class, config=config, temperature=temperature,
                         work_dir=work_dir, progress=progress)


def _evaluate(ws, tasks, budgets, *, strategies, seeds, shots, test_per_class, config, temperature, work_dir,
              progress) -> pa.Table:
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or not strategies:
        raise NDSError(f"unknown strategies {unknown or list(strategies)}; choose from: {', '.join(STRATEGIES)}")
    if not tasks:
        raise NDSError(f"give at least one target task: {', '.join(TASKS)} or your own folders")
    for t in tasks:
        if isinstance(t, str) and t not in TASKS:
            raise NDSError(f"unknown target task {t!r}; choose one of: {', '.join(TASKS)}")
    if not seeds:
        raise NDSError("give at least one seed")
    pool = load_source_pool(ws)
    counts = resolve_budgets(budgets, pool.size)
    strategies = [s for s in STRATEGIES if s in strategies]
    plan = []
    for s in strategies:
        run_budgets = counts if s in BUDGETED else [pool.size if s == "all" else 0]
        plan.extend((s, b) for b in run_budgets)
    cache: dict[str, Any] = {}
    rows = []
    own_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="nds-eval-")) if own_dir else Path(work_dir)
    total = len(tasks) * len(seeds) * len(plan)
    bar = tqdm(total=total, desc="evaluate", unit="run", disable=not progress)
    try:
        for t in tasks:
            for seed in seeds:
                task = (build_target_task(ws, t, shots=shots, seed=seed, test_per_class=test_per_class)
                        if isinstance(t, str) else t)
                scores = score_task(ws, task, seed=seed) if "nds" in strategies else None
                for strategy, budget in plan:
                    bar.set_postfix_str(f"{task.name} {strategy} {budget} seed {seed}")
                    mdir = work / "manifests" / f"{task.name}-{strategy}-{budget}-seed{seed}"
                    positions = select_for_strategy(ws, pool, strategy, budget, seed=seed, scores=scores,
                                                    temperature=temperature,
                                                    manifest_dir=mdir if strategy == "nds" else None)
                    t0 = time.perf_counter()
                    model = None
                    if len(positions):
                        key = _selection_key(positions, seed, config)
                        if key not in cache:
                            cache[key] = pretrain(pool.images[positions], pool.labels[positions], config=config,
                                                  seed=seed, progress=progress)
                        model = cache[key]
                    t1 = time.perf_counter()
                    acc = finetune_and_test(model, task.train_images, task.train_labels, task.test_images,
                                            task.test_labels, config=config, seed=seed)
                    rows.append({
                        "task": task.name, "domain": task.domain, "strategy": strategy, "budget": int(budget),
                        "budget_fraction": budget / pool.size, "seed": int(seed), "accuracy": float(acc),
                        "domain_precision": domain_precision(pool, positions, task.domain),
                        "n_pretrain": int(len(positions)), "pretrain_seconds": round(t1 - t0, 3),
                        "finetune_seconds": round(time.perf_counter() - t1, 3),
                    })
                    log.info("%s %s budget %d seed %d: accuracy %.3f", task.name, strategy, budget, seed, acc)
                    bar.update(1)
    finally:
        bar.close()
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)


RESULTS_SCHEMA = pa.schema([
    ("task", pa.string()), ("domain", pa.string()), ("strategy", pa.string()), ("budget", pa.int64()),
    ("budget_fraction", pa.float64()), ("seed", pa.int64()), ("accuracy", pa.float64()),
    ("domain_precision", pa.float64()), ("n_pretrain", pa.int64()), ("pretrain_seconds", pa.float64()),
    ("finetune_seconds", pa.float64()),
])


# --------------------------------------------------------------------------- summaries + outputs


def summarize(results: pa.Table) -> pa.Table:
    """Mean and std (over seeds) of accuracy and domain precision per task, strategy, budget."""
    groups: dict[tuple, list[dict]] = {}
    for r in results.to_pylist():
        groups.setdefault((r["task"], r["strategy"], r["budget"]), []).append(r)
    order = {s: i for i, s in enumerate(STRATEGIES)}
    out = []
    for (task, strategy, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2])):
        acc = np.asarray([r["accuracy"] for r in rs])
        prec = [r["domain_precision"] for r in rs if r["domain_precision"] is not None]
        out.append({
            "task": task, "strategy": strategy, "budget": budget, "budget_fraction": rs[0]["budget_fraction"],
            "n_seeds": len(rs), "accuracy_mean": float(acc.mean()),
            "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "domain_precision_mean": float(np.mean(prec)) if prec else None,
        })
    return pa.Table.from_pylist(out, schema=pa.schema([
        ("task", pa.string()), ("strategy", pa.string()), ("budget", pa.int64()), ("budget_fraction", pa.float64()),
        ("n_seeds", pa.int64()), ("accuracy_mean", pa.float64()), ("accuracy_std", pa.float64()),
        ("domain_precision_mean", pa.float64()),
    ]))


def fit_strategies(results: pa.Table) -> dict[str, dict[str, LogLinearFit]]:
    """task -> strategy -> log-linear fit, for strategies measured at >= 2 distinct budgets."""
    fits: dict[str, dict[str, LogLinearFit]] = {}
    rows = results.to_pylist()
    for task in dict.fromkeys(r["task"] for r in rows):
        for strategy in BUDGETED:
            pts = [(r["budget"], r["accuracy"]) for r in rows if r["task"] == task and r["strategy"] == strategy]
            if len({b for b, _ in pts}) >= 2:
                fits.setdefault(task, {})[strategy] = fit_log_linear([b for b, _ in pts], [a for _, a in pts])
    return fits


def summary_markdown(summary: pa.Table, fits: dict[str, dict[str, LogLinearFit]]) -> str:
    lines = ["| task | strategy | budget | fraction | accuracy (mean ± std) | seeds | domain precision |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in summary.to_pylist():
        prec = "" if r["domain_precision_mean"] is None else f"{r['domain_precision_mean']:.2f}"
        lines.append(f"| {r['task']} | {r['strategy']} | {r['budget']} | {r['budget_fraction']:.1%} | "
                     f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | {r['n_seeds']} | {prec} |")
    if fits:
        lines += ["", "Fitted acc = a + b·ln(budget) (least squares over seeds; ± standard errors):", "",
                  "| task | strategy | a | b | points |", "|---|---|---:|---:|---:|"]
        for task, per in fits.items():
            for strategy, f in per.items():
                lines.append(f"| {task} | {strategy} | {f.a:.3f} ± {f.se_a:.3f} | {f.b:.4f} ± {f.se_b:.4f} | {f.n_points} |")
    return "\n".join(lines) + "\n"


def plot_results(summary: pa.Table, path: Path) -> Path:
    """Accuracy vs budget (log x) per strategy, one panel per task; ``all``/``none`` as lines."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise NDSError("plotting needs matplotlib: pip install 'matplotlib>=3.8'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = summary.to_pylist()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    colours = {"nds": "tab:blue", "uniform": "tab:orange", "all": "tab:green", "none": "tab:grey"}
    for ax, task in zip(axes[0], tasks):
        budgets = sorted({r["budget"] for r in rows if r["task"] == task and r["strategy"] in BUDGETED}) or [1]
        for strategy in STRATEGIES:
            rs = sorted((r for r in rows if r["task"] == task and r["strategy"] == strategy), key=lambda r: r["budget"])
            if not rs:
                continue
            m = np.asarray([r["accuracy_mean"] for r in rs])
            s = np.asarray([r["accuracy_std"] for r in rs])
            if strategy in BUDGETED:
                x = [r["budget"] for r in rs]
                ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=strategy, color=colours[strategy])
            else:
                label = f"{strategy} ({rs[0]['budget']})" if strategy == "all" else strategy
                ax.axhline(m[0], ls="--", color=colours[strategy], label=label)
                ax.axhspan(m[0] - s[0], m[0] + s[0], color=colours[strategy], alpha=0.12)
        ax.set_xscale("log")
        ax.set_xlim(min(budgets) / 1.3, max(budgets) * 1.3)
        # Ticks at the measured budgets only: log minor labels (2x10^3, 3x10^3, ...) overlap.
        ax.set_xticks(budgets, [f"{b:,}" for b in budgets], fontsize=8)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(task)
        ax.set_xlabel("pre-training budget (source samples, log)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def fits_to_dict(fits: dict[str, dict[str, LogLinearFit]]) -> dict:
    return {t: {s: {**asdict(f), "budget_range": list(f.budget_range)} for s, f in per.items()} for t, per in fits.items()}


def write_outputs(results: pa.Table, out_dir: Path, *, meta: dict | None = None) -> dict:
    """results.parquet, summary.parquet/.csv/.md, fits.json, accuracy_vs_budget.png; atomic per file.

    Returns {"summary": Table, "fits": {...}, "markdown": str, "paths": {name: str}}.
    """
    import pyarrow.csv as pacsv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    fits = fit_strategies(results)
    markdown = summary_markdown(summary, fits)
    paths = {}

    def _atomic(key: str, name: str, write: Callable[[Path], None]) -> None:
        final = out / name
        tmp = out / f".{name}.tmp-{os.getpid()}"
        try:
            write(tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        paths[key] = str(final)

    _atomic("results", "results.parquet", lambda p: pq.write_table(results, p))
    _atomic("summary", "summary.parquet", lambda p: pq.write_table(summary, p))
    _atomic("summary_csv", "summary.csv", lambda p: pacsv.write_csv(summary, p))
    _atomic("markdown", "summary.md", lambda p: p.write_text(markdown))
    doc = {"meta": meta or {}, "fits": fits_to_dict(fits)}
    _atomic("fits", "fits.json", lambda p: p.write_text(json.dumps(doc, indent=2, default=str) + "\n"))
    paths["plot"] = str(plot_results(summary, out / "accuracy_vs_budget.png"))
    return {"summary": summary, "fits": fits, "markdown": markdown, "paths": paths}


def fits_from_dict(doc: dict) -> dict[str, dict[str, LogLinearFit]]:
    return {t: {s: LogLinearFit(**{**f, "budget_range": tuple(f["budget_range"])}) for s, f in per.items()}
            for t, per in doc.items()}


def load_fits(out_dir: Path) -> dict[str, dict[str, LogLinearFit]]:
    """The fits written by ``write_outputs`` (for `nds evaluate --from`)."""
    path = Path(out_dir) / "fits.json"
    if not path.exists():
        raise NDSError(f"{path} not found: run `nds evaluate` with --out {out_dir} first")
    return fits_from_dict(json.loads(path.read_text())["fits"])


def record_evaluation(ws: Workspace, results: pa.Table, *, evaluation_id: str, index_version: str,
                      params: dict) -> int:
    """Insert one row per run into the warehouse ``evaluations`` table (one transaction)."""
    from nds.platform.warehouse import connect

    created = datetime.now(timezone.utc).replace(tzinfo=None)
    rows = [[evaluation_id, created, index_version, r["task"], r["domain"], r["strategy"], r["budget"],
             r["budget_fraction"], r["seed"], r["accuracy"], r["domain_precision"], r["n_pretrain"],
             r["pretrain_seconds"], r["finetune_seconds"], json.dumps(params, sort_keys=True, default=str)]
            for r in results.to_pylist()]
    with connect(ws.warehouse_path) as con:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM evaluations WHERE evaluation_id = ?", [evaluation_id])
            con.executemany("INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return len(rows)


def new_evaluation_id() -> str:
    return f"eval-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{os.urandom(6).hex()}"


def budget_answer_lines(fits: dict[str, dict[str, LogLinearFit]], target_acc: float, *, n_source: int) -> list[str]:
    """Human-readable "what budget reaches accuracy X?" per task and strategy."""
    lines = []
    for task, per in fits.items():
        for strategy, f in per.items():
            budget, low, high = predict_budget(f, target_acc, max_budget=n_source)
            if not math.isfinite(budget):
                why = ("accuracy does not rise with budget" if f.b <= 0 else
                       f"would need ~{math.exp((target_acc - f.a) / f.b):,.0f} samples, more than the {n_source:,} in the source")
                lines.append(f"{task} {strategy}: accuracy {target_acc:.3f} is out of reach ({why})")
            else:
                interval = "" if not math.isfinite(low) else f" (95% interval {low:,.0f} - {high:,.0f})"
                extrap = "" if f.budget_range[0] <= budget <= f.budget_range[1] else " [extrapolated]"
                lines.append(f"{task} {strategy}: accuracy {target_acc:.3f} at ~{budget:,.0f} samples"
                             f" ({budget / n_source:.1%} of the source){interval}{extrap}")
    return lines


# --------------------------------------------------------------------------- request


class EvaluateRequest(BaseModel):
    """Parameters of one transfer evaluation (the Prefect UI renders this as a form)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=lambda: ["digits"],
                             description=f"Built-in target tasks: {', '.join(TASKS)}.")
    train_dir: str | None = Field(None, description="Or: your own labelled train ImageFolder (with test_dir).")
    test_dir: str | None = Field(None, description="Your own labelled test ImageFolder.")
    budgets: list[float] = Field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2],
                                 description="Counts (>= 1) or fractions (< 1) of the indexed source.")
    strategies: list[str] = Field(default_factory=lambda: list(STRATEGIES))
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    shots: int = Field(10, ge=1, description="Labelled train images per class of a built-in task.")
    test_per_class: int = Field(50, ge=1)
    temperature: float | None = Field(None, gt=0, description="Selection temperature (default: the server's).")
    train: TrainConfig = Field(default_factory=TrainConfig)
    out_dir: str | None = Field(None, description="Output folder (default: evaluations/<evaluation id>).")

    @field_validator("budgets")
    @classmethod
    def _valid_budgets(cls, value: list[float]) -> list[float]:
        # Checked when the form is submitted, not when the run starts (the index size is
        # checked later, by resolve_budgets).
        if not value:
            raise ValueError("give at least one budget (a count such as 2000 or a fraction such as 0.1)")
        for b in value:
            if not math.isfinite(b) or b <= 0:
                raise ValueError(f"budget {b!r} must be a positive count or a fraction in (0, 1)")
            if b >= 1 and b != int(b):
                raise ValueError(f"budget {b} is neither a whole count nor a fraction below 1: use e.g. 500 or 0.1")
        return value

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown target task(s) {unknown}; choose from: {', '.join(TASKS)}")
        return value

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, value: list[str]) -> list[str]:
        if not value or set(value) - set(STRATEGIES):
            raise ValueError(f"strategies must be some of: {', '.join(STRATEGIES)}")
        return value

    def target_tasks(self) -> list[str | TargetTask]:
        if (self.train_dir is None) != (self.test_dir is None):
            raise NDSError("give both train_dir and test_dir for your own target, or neither")
        if self.train_dir is not None:
            return [load_target_task(Path(self.train_dir), Path(self.test_dir),
                                     name=Path(self.train_dir).resolve().parent.name or "custom")]
        return list(self.tasks)


#: The `--quick` profile: one task, one seed, two budgets and short training (tests, smoke runs).
QUICK = {
    "tasks": ["digits"], "budgets": [0.1, 0.3], "seeds": [0], "shots": 2, "test_per_class": 10,
    "train": TrainConfig(pretrain_epochs=None, pretrain_steps=30, pretrain_batch=64, finetune_steps=25,
                         finetune_batch=32),
}


def quick_request(**overrides) -> EvaluateRequest:
    return EvaluateRequest(**{**QUICK, **overrides})
