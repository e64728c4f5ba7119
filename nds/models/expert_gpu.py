"""Rotation-expert training on a GPU: the recipe of ``nds.models.experts.train_expert``, GPU-shaped.

The same split, sample order, flips, optimiser and schedule (one numpy generator drives them, as
on the CPU), with the cluster's images uploaded once as uint8 and preprocessed, rotated and
flipped on the GPU, no host synchronisation inside the loop (the loss is read once at the end),
and the work on its own CUDA stream, so several experts trained side by side (threads:
``train_experts.workers``) overlap on one GPU instead of waiting on each other's small kernels.

What changes against the CPU: the bytes of the expert. cuDNN picks its convolution algorithms by
timing them (``prepare_cuda``), TF32 is allowed and some backward kernels accumulate with
atomics, so a GPU-trained expert differs from the CPU's in the last bits and may differ between
two GPU runs. The bundle records the device (``train_device`` and each entry's ``device``) and
the index version includes it; CPU-trained bundles are unchanged.
"""

from __future__ import annotations

import time

import numpy as np

from nds.errors import InvalidInputError
from nds.models.device import cuda_stream, gpu_memory_guard, prepare_cuda
from nds.models.experts import _INIT_LOCK, N_ROTATIONS, build_expert, normalise, rotate_batch, rotation_accuracy

#: Images per forward pass when measuring held-out rotation accuracy on the GPU.
EVAL_BATCH = 1024


def train_expert_on_device(images: np.ndarray, *, arch: str, epochs: int, max_steps: int, batch_size: int,
                           lr: float, val_fraction: float, seed: int, device) -> tuple[object, dict]:
    """``train_expert`` on ``device`` (CUDA). Returns (model on the CPU, metrics).

    images: (n, s, s, 3) uint8 at the experts' input size (``train_experts.image_size``), uploaded
    once as uint8: n * s * s * 3 bytes of GPU memory beside the batches' activations.
    """
    import torch

    n = len(images)
    if n == 0:
        raise InvalidInputError("cannot train an expert on an empty cluster; lower cluster.k in params.yaml")
    prepare_cuda()
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = int(round(n * val_fraction)) if n >= 10 else 0
    val_idx, train_idx = order[:n_val], order[n_val:]
    with _INIT_LOCK:  # the CPU's initialisation, then moved: the same starting weights
        torch.manual_seed(seed)
        model = build_expert(arch)
    steps_per_epoch = max(1, int(np.ceil(len(train_idx) / batch_size)))
    total = min(max_steps, epochs * steps_per_epoch)
    guard = gpu_memory_guard(device, what=f"training an expert on {n} images of {images.shape[1]} px",
                             knob="train_experts.batch_size", value=batch_size)
    with guard, cuda_stream(device):
        model = model.to(device)
        data = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4, fused=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
        loss_fn = torch.nn.CrossEntropyLoss()
        t0, step, last_loss = time.perf_counter(), 0, None
        model.train()
        while step < total:
            perm = train_idx[rng.permutation(len(train_idx))]
            for s in range(0, len(perm), batch_size):
                if step >= total:
                    break
                batch = torch.from_numpy(np.sort(perm[s : s + batch_size])).to(device, non_blocking=True)
                x, y = rotate_batch(normalise(data[batch]))
                if rng.random() < 0.5:  # the CPU recipe's random flips, from the same generator
                    x = torch.flip(x, dims=(3,))
                    y = (N_ROTATIONS - y) % N_ROTATIONS
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                last_loss = loss.detach()
        final_loss = float(last_loss) if last_loss is not None else float("nan")  # the one synchronisation
        seconds = time.perf_counter() - t0
        eval_images = images[np.sort(val_idx)] if n_val else images[np.sort(train_idx)]
        eval_batches = [rotate_batch(normalise(torch.from_numpy(eval_images[i : i + EVAL_BATCH]).to(device)))
                        for i in range(0, len(eval_images), EVAL_BATCH)]
        accuracy = rotation_accuracy(model, eval_images, batches=eval_batches, device=device)
        model = model.eval().to("cpu")  # saved like a CPU expert: CPU tensors, the same file format
    metrics = {
        "n_images": int(n),
        "n_val": int(n_val),
        "steps": int(step),
        "final_loss": round(final_loss, 4),
        "rotation_accuracy": round(accuracy, 4),
        "train_seconds": round(seconds, 3),
        "images_per_second": round(step * batch_size * N_ROTATIONS / seconds, 1) if seconds else None,
    }
    return model, metrics
