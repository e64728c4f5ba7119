"""The pre-training and fine-tuning recipe: a small CNN, trained identically for every strategy.

Pre-training runs ``TrainConfig.pretrain_epochs`` passes over the selection, clamped to
[``pretrain_min_steps``, ``pretrain_steps``] optimisation steps (``pretrain_schedule``): every
strategy gets the same per-sample training (30 epochs) until the cap, so ``all`` is trained
properly (3,600 steps, ~20 epochs of the 22k-image ``small`` source) rather than starved, and
tiny selections get a floor of steps. With ``pretrain_epochs=None`` every selection gets
exactly ``pretrain_steps`` steps (equal compute whatever the budget). ``none`` and every
pre-trained model get the identical fine-tuning recipe.

``device`` (a ``torch.device``; None = the CPU) moves the data and the model there for training
and testing; the random draws (batches, shifts) still come from the same CPU generator, and
models are handed back on the CPU. On the CPU nothing changes.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from nds.errors import InvalidInputError

log = logging.getLogger(__name__)


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
    if x.device.type != "cpu":  # drawn on the CPU generator (the same shifts as there), used on the device
        dx, dy, ar = dx.to(x.device, non_blocking=True), dy.to(x.device, non_blocking=True), ar.to(x.device)
    rows = (dy[:, None] + ar[None, :])[:, None, :, None].expand(n, x.shape[1], size, size + 2 * pad)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + ar[None, :])[:, None, None, :].expand(n, x.shape[1], size, size)
    return torch.gather(out, 3, cols)


def _train_loop(model, params, x, y, *, steps: int, batch: int, lr: float, seed: int, desc: str,
                progress: bool, weight_decay: float = 5e-4, knob: str = "batch") -> float:
    """Adam with cosine decay for a fixed number of steps on (x: (n,3,32,32) float, y: (n,) long).

    x, y and model on one device. Batches and shifts come from one CPU generator on every
    device, and the loss is read once, at the end, so a GPU never waits on a per-step sync
    (knob: the batch setting an out-of-memory error names).
    """
    if x.device.type == "cpu":
        return _run_steps(model, params, x, y, steps=steps, batch=batch, lr=lr, seed=seed, desc=desc,
                          progress=progress, weight_decay=weight_decay)
    from nds.models.device import gpu_memory_guard

    with gpu_memory_guard(x.device, what=desc, knob=knob, value=batch):
        return _run_steps(model, params, x, y, steps=steps, batch=batch, lr=lr, seed=seed, desc=desc,
                          progress=progress, weight_decay=weight_decay)


def _run_steps(model, params, x, y, *, steps, batch, lr, seed, desc, progress, weight_decay) -> float:
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
    last = None
    for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        if at + batch > n:
            perm, at = torch.randperm(n, generator=g), 0
        idx = perm[at:at + batch].to(x.device, non_blocking=True)  # a no-op on the CPU
        at += batch
        loss_t = loss_fn(model(_augment(x[idx], g)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        opt.step()
        sched.step()
        last = loss_t.detach()
    return float(last) if last is not None else float("nan")


def pretrain(images: np.ndarray, labels: np.ndarray, *, config: TrainConfig | None = None, seed: int = 0,
             progress: bool = False, device=None):
    """Train a fresh ``build_model`` on ``images: (n, 32, 32, 3) uint8`` with ``labels: (n,) str``.

    ``pretrain_schedule(n, config)`` steps. Returns the model (its head is the source classifier),
    on the CPU. device: a ``torch.device`` to train on (None: the CPU).
    """
    import torch

    from nds.models.experts import preprocess

    config = config or TrainConfig()
    if len(images) < 2 or len(images) != len(labels):
        raise InvalidInputError(f"pre-training needs >= 2 labelled images, got {len(images)} images, {len(labels)} labels")
    names, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    torch.manual_seed(seed)
    model = build_model(len(names), width=config.width)
    x, y = preprocess(images), torch.from_numpy(codes.astype(np.int64))
    if device is not None and device.type != "cpu":
        model, x, y = model.to(device), x.to(device), y.to(device)
    loss = _train_loop(model, model.parameters(), x, y, steps=pretrain_schedule(len(images), config),
                       batch=config.pretrain_batch,
                       lr=config.pretrain_lr, seed=seed, desc=f"pre-train ({len(images)} images)", progress=progress,
                       knob="train.pretrain_batch")
    log.debug("pre-trained on %d images, %d classes: final loss %.3f", len(images), len(names), loss)
    return model.to("cpu") if device is not None and device.type != "cpu" else model


def finetune_and_test(model, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                      test_labels: np.ndarray, *, config: TrainConfig | None = None, seed: int = 0,
                      progress: bool = False, device=None) -> float:
    """Replace the head, fine-tune on the train set, return test accuracy in [0, 1].

    ``model``: a pre-trained ``build_model`` (not modified: a copy is trained) or None for
    training from scratch. images: (n, 32, 32, 3) uint8; labels: (n,) str.
    device: a ``torch.device`` to fine-tune and test on (None: the CPU).
    """
    import torch

    from nds.models.experts import preprocess

    config = config or TrainConfig()
    names, codes = np.unique(np.asarray(train_labels).astype(str), return_inverse=True)
    if len(names) < 2:
        raise InvalidInputError("fine-tuning needs >= 2 classes in the train set")
    lookup = {c: i for i, c in enumerate(names)}
    test_labels = np.asarray(test_labels).astype(str)
    if len(test_labels) == 0 or not set(test_labels) <= set(lookup):
        raise InvalidInputError("the test set must be non-empty and use only classes of the train set")
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
    on_device = device is not None and device.type != "cpu"
    if on_device:
        net, x, y = net.to(device), x.to(device), y.to(device)
        # net.to moved the parameters in place: the optimiser's groups still hold them
    _train_loop(net, params, x, y, steps=config.finetune_steps, batch=config.finetune_batch,
                lr=config.finetune_lr, seed=seed + 1, desc="fine-tune", progress=progress, knob="train.finetune_batch")
    net.eval()
    correct = 0
    with torch.inference_mode():
        for s in range(0, len(test_images), 512):
            xs = preprocess(test_images[s:s + 512])
            if on_device:
                pred = net(xs.to(device)).argmax(1).cpu().numpy()
            else:
                pred = net(xs).argmax(1).numpy()
            correct += int((names[pred] == test_labels[s:s + 512]).sum())
    return correct / len(test_labels)
