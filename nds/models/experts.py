"""Rotation experts: one small CNN per cluster, trained to predict 0/90/180/270 degrees.

The network both the server (training) and the client (scoring) run. The expert bundle
(`experts/` with `expert_XXX.pt` files and `bundle.json`) is what clients download:
small, self-describing (``bundle_fields``: architecture, input size, preprocessing) and
checksummed; the document itself lives in ``nds.formats.bundle``.

The networks end in global pooling, so one architecture trains and scores at any square input
size (``train_experts.image_size``); the bundle's ``input_size`` says which one its experts saw.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from nds._io import file_sha256, write_bytes
from nds._registry import EXPERT_ARCHS
from nds.errors import InvalidInputError, NotFoundError

log = logging.getLogger(__name__)

_INIT_LOCK = threading.Lock()
N_ROTATIONS = 4
#: Experts see the corpus at its stored size by default (``train_experts.image_size``); bundles
#: made before the size was configurable all say 32.
EXPERT_INPUT_SIZE = 32
#: Input sizes a bundle may declare: three stride-2 stages leave 2 px at 16; 256 px already
#: costs 64x the 32 px compute per image.
MIN_INPUT_SIZE = 16
MAX_INPUT_SIZE = 256
#: Per-channel normalisation applied by experts (documented in bundle.json for clients).
PREPROCESSING = {"scale": 1 / 255.0, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "layout": "NCHW RGB"}


@EXPERT_ARCHS.register("rotnet_small")
def _rotnet_small():
    import torch.nn as nn

    def block(cin, cout):
        # Strided convolutions instead of pooling: 2.4x the training throughput on CPU
        # (measured with benchmarks/expert_training.py) for the same parameter count.
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class RotNetSmall(nn.Module):
        """~0.1M parameters: three strided conv stages (32->4 px), global pooling, a 4-way head."""

        feature_dim = 128

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(128, N_ROTATIONS)

        def forward(self, x):
            return self.head(self.features(x))

    return RotNetSmall()


def build_expert(arch: str):
    """A fresh network of architecture ``arch`` (a name in EXPERT_ARCHS, as bundle.json records it)."""
    return EXPERT_ARCHS[arch]()


def bundle_fields(arch: str, input_size: int = EXPERT_INPUT_SIZE) -> dict:
    """What bundle.json records about the network (``nds.formats.bundle.write_bundle(network=...)``).

    input_size: the side of the square images the experts were trained on.
    """
    return {
        "architecture": arch,
        "input_size": input_size,
        "feature_dim": build_expert(arch).feature_dim,
        "preprocessing": PREPROCESSING,
    }


def preprocess(images: np.ndarray):
    """uint8 (n, s, s, 3) -> normalised float tensor (n, 3, s, s), s the experts' input size."""
    import torch

    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise InvalidInputError(f"experts take square uint8 images of shape (n, s, s, 3), s their input size "
                                f"(default (n, {EXPERT_INPUT_SIZE}, {EXPERT_INPUT_SIZE}, 3)); got {images.shape}")
    return normalise(torch.from_numpy(np.ascontiguousarray(images)))


def normalise(x):
    """uint8 tensor (n, s, s, 3) on any device -> normalised float (n, 3, s, s) on that device."""
    import torch

    x = x.permute(0, 3, 1, 2).float().mul_(PREPROCESSING["scale"])
    mean = torch.tensor(PREPROCESSING["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESSING["std"], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def rotate_batch(x):
    """(n, C, H, W) -> all four rotations (4n, C, H, W) and their labels (4n,), on x's device."""
    import torch

    rots = [torch.rot90(x, r, dims=(2, 3)) for r in range(N_ROTATIONS)]
    labels = torch.arange(N_ROTATIONS, device=x.device).repeat_interleave(len(x))
    return torch.cat(rots), labels


def rotated_batches(images: np.ndarray, *, batch_size: int = 256) -> Iterator[tuple[object, object]]:
    """(x (4b, 3, s, s), y (4b,)) per `batch_size` images (n, s, s, 3): preprocessed, all four rotations."""
    for s in range(0, len(images), batch_size):
        yield rotate_batch(preprocess(images[s : s + batch_size]))


def rotation_accuracy(model, images: np.ndarray, *, batch_size: int = 256, batches=None, device=None) -> float:
    """Share of the 4 rotations of `images: (n, s, s, 3) uint8` the model gets right.

    batches: ``list(rotated_batches(images))`` made once and shared by several models (the
    client scores every expert on the same images); made here batch by batch if None.
    device: where ``model`` is (None: the CPU); batches are moved there (a no-op if already).
    """
    return _rotation_mean(model, images, lambda out, y: (out.argmax(1) == y).sum(), batch_size, batches, device)


def rotation_confidence(model, images: np.ndarray, *, batch_size: int = 256, batches=None, device=None) -> float:
    """Mean probability the model gives the right rotation of each of the 4 rotations of
    `images` (a "soft" accuracy: every image adds its margin, not just right or wrong, so the
    mean over a few images is less noisy). Arguments as ``rotation_accuracy``."""
    import torch

    def right(out, y):
        return torch.softmax(out.float(), 1).gather(1, y.view(-1, 1)).sum()

    return _rotation_mean(model, images, right, batch_size, batches, device)


def _rotation_mean(model, images, per_batch, batch_size, batches, device) -> float:
    """Mean over the 4 rotations of `images` of ``per_batch(logits, labels)`` (a 0-d tensor sum)."""
    import torch

    if len(images) == 0:
        return float("nan")
    model.eval()
    total = 0
    with torch.inference_mode():
        for x, y in batches if batches is not None else rotated_batches(images, batch_size=batch_size):
            if device is not None:  # summed on the device: one synchronisation at the end
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                total = per_batch(model(x), y) + total
            else:
                total += per_batch(model(x), y).item()
    return float(total) / (N_ROTATIONS * len(images))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (None: as set), then restore the setting."""
    import torch

    if n is None:
        yield
        return
    if n < 1:
        raise InvalidInputError(f"threads must be >= 1, got {n}")
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def train_expert(
    images: np.ndarray,
    *,
    arch: str = "rotnet_small",
    epochs: int = 4,
    max_steps: int = 300,
    batch_size: int = 128,
    lr: float = 0.003,
    val_fraction: float = 0.1,
    seed: int = 0,
    device=None,
) -> tuple[object, dict]:
    """Train one rotation expert on `images: (n, s, s, 3) uint8` (one cluster, s its input size).

    Returns (model, metrics), the model on the CPU. Deterministic for a given seed and thread
    count on the CPU. device: a CUDA ``torch.device`` trains there (nds.models.expert_gpu: the
    same recipe and sample order, not the same bytes); None or the CPU: this function's loop.
    """
    import torch

    from nds.models.device import is_cpu

    if not is_cpu(device):
        from nds.models.expert_gpu import train_expert_on_device

        return train_expert_on_device(images, arch=arch, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                                      lr=lr, val_fraction=val_fraction, seed=seed, device=device)
    n = len(images)
    if n == 0:
        raise InvalidInputError("cannot train an expert on an empty cluster; lower cluster.k in params.yaml")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = int(round(n * val_fraction)) if n >= 10 else 0
    val_idx, train_idx = order[:n_val], order[n_val:]
    with _INIT_LOCK:  # torch's global RNG: experts built side by side must not interleave
        torch.manual_seed(seed)
        model = build_expert(arch)
    steps_per_epoch = max(1, int(np.ceil(len(train_idx) / batch_size)))
    total = min(max_steps, epochs * steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    loss_fn = torch.nn.CrossEntropyLoss()
    t0, step, last_loss = time.perf_counter(), 0, float("nan")
    model.train()
    while step < total:
        perm = train_idx[rng.permutation(len(train_idx))]
        for s in range(0, len(perm), batch_size):
            if step >= total:
                break
            batch = np.sort(perm[s : s + batch_size])
            x, y = rotate_batch(preprocess(images[batch]))
            # Random flips keep the rotation task from keying on one pixel pattern.
            if rng.random() < 0.5:
                x = torch.flip(x, dims=(3,))
                y = (N_ROTATIONS - y) % N_ROTATIONS
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            last_loss = float(loss.detach())
    seconds = time.perf_counter() - t0
    eval_images = images[np.sort(val_idx)] if n_val else images[np.sort(train_idx)]
    metrics = {
        "n_images": int(n),
        "n_val": int(n_val),
        "steps": int(step),
        "final_loss": round(last_loss, 4),
        "rotation_accuracy": round(rotation_accuracy(model, eval_images), 4),
        "train_seconds": round(seconds, 3),
        "images_per_second": round(step * batch_size * N_ROTATIONS / seconds, 1) if seconds else None,
    }
    model.eval()
    return model, metrics


def save_expert(model, path: Path, *, meta: dict) -> str:
    """Atomically write an expert (state_dict + meta); returns the file's sha256."""
    import torch

    # Serialise in memory: torch.save names the archive after the file it writes, so saving
    # straight to a temporary name would make identical experts differ byte for byte.
    buf = io.BytesIO()
    torch.save({"meta": meta, "state_dict": model.state_dict()}, buf)
    data = buf.getvalue()
    write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def load_expert(path: Path, *, expected_sha256: str | None = None):
    """Load one expert; refuses a file whose checksum does not match the bundle."""
    import torch

    if not path.exists():
        raise NotFoundError(f"expert file {path} is missing; fetch the bundle again")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise InvalidInputError(f"expert file {path} does not match its checksum in bundle.json; fetch the bundle again")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = build_expert(blob["meta"]["arch"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["meta"]
