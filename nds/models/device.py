"""Where the networks run: the ``device`` setting, its errors, mixed precision, GPU memory errors.

One setting everywhere: ``auto`` (the default: CUDA when torch sees a GPU, else the CPU),
``cpu``, ``cuda`` or ``cuda:N``. The first of these that is set wins: the caller's argument
(``--device``), the ``NDS_DEVICE`` environment variable, params.yaml (``extract.device``,
``train_experts.device``), ``auto``.

On the CPU every caller runs exactly the code it ran before devices existed (no autocast, the
same batches, the same threads), so CPU outputs stay byte-identical; the accelerated paths are
separate branches that a resolved CUDA device (or an explicit reduced precision) takes.
torch is imported inside the functions, so reading or checking the setting stays light.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager, nullcontext
from typing import Iterator

from nds.errors import InvalidInputError, NDSError

log = logging.getLogger(__name__)

#: Overrides params.yaml for every stage and command of this process (and its Dask tasks).
DEVICE_ENV = "NDS_DEVICE"
DEFAULT_DEVICE = "auto"
#: Inference precision: auto is bf16 on a GPU that has it (else fp16) and fp32 on the CPU.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_SPEC = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


class DeviceUnavailableError(InvalidInputError):
    """A device was asked for that this machine (or this torch build) does not have."""


class DeviceOutOfMemoryError(NDSError):
    """The GPU ran out of memory; the message names the batch size to lower."""


def check_device_spec(value: object, *, where: str | None = "device") -> str:
    """``value`` as a device setting (auto, cpu, cuda, cuda:N), or InvalidInputError naming ``where``."""
    spec = str(value).strip().lower()
    if not _SPEC.fullmatch(spec):
        prefix = f"{where}: " if where else ""
        raise InvalidInputError(f"{prefix}{value!r} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:1)")
    return spec


def check_precision(value: object, *, where: str | None = "precision") -> str:
    spec = str(value).strip().lower()
    if spec not in PRECISIONS:
        prefix = f"{where}: " if where else ""
        raise InvalidInputError(f"{prefix}{value!r} is not a precision; use one of {', '.join(PRECISIONS)}")
    return spec


def device_setting(explicit: str | None = None, configured: str | None = None, *,
                   where: str = "params.yaml") -> tuple[str, str]:
    """(setting, where it came from): ``explicit``, else $NDS_DEVICE, else ``configured``, else auto."""
    if explicit is not None:
        return check_device_spec(explicit, where="--device"), "--device"
    env = os.environ.get(DEVICE_ENV, "").strip()
    if env:
        return check_device_spec(env, where=DEVICE_ENV), DEVICE_ENV
    if configured is not None:
        return check_device_spec(configured, where=where), where
    return DEFAULT_DEVICE, "the default"


#: The ``--device`` option's help, shared by every command that has it.
DEVICE_HELP = ("where the networks run: auto (default: CUDA if there is a GPU, else the CPU), cpu, cuda or cuda:N; "
               f"overrides ${DEVICE_ENV} and params.yaml")


def device_argument(value: str) -> str:
    """argparse ``type=`` for ``--device``: a bad value is argparse's one-line usage error."""
    import argparse

    try:
        return check_device_spec(value, where=None)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def apply_device_option(value: str | None) -> None:
    """What ``--device`` does: resolve it now (``cuda`` without a GPU fails before any work) and
    export it as $NDS_DEVICE, which this process's stages read and the stage flows pass to Dask tasks."""
    if value is None:
        return
    resolve_device(value, source="--device")
    os.environ[DEVICE_ENV] = check_device_spec(value, where="--device")


def resolve_device(spec: str = DEFAULT_DEVICE, *, source: str = "device"):
    """The ``torch.device`` a setting names on this machine.

    ``auto``: the current CUDA device if torch sees one, else the CPU. ``cuda``/``cuda:N``
    without CUDA (or past the last GPU) is a DeviceUnavailableError naming ``source``.
    """
    import torch

    spec = check_device_spec(spec, where=source)
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        raise DeviceUnavailableError(
            f"{source} asks for {spec!r} but torch sees no CUDA GPU here (torch {torch.__version__}, {build}): "
            "set it to auto or cpu, or run on a machine with an NVIDIA GPU and driver")
    count = torch.cuda.device_count()
    index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    if index >= count:
        raise DeviceUnavailableError(f"{source} asks for {spec!r} but this machine has {count} CUDA device(s) "
                                     f"(cuda:0 .. cuda:{count - 1}): pick one of those, or use cuda or auto")
    return torch.device("cuda", index)


def pick_device(explicit: str | None = None, configured: str | None = None, *, where: str = "params.yaml"):
    """``resolve_device`` of ``device_setting(explicit, configured)``; the error names the winning source."""
    spec, source = device_setting(explicit, configured, where=where)
    return resolve_device(spec, source=source)


def is_cpu(device) -> bool:
    return device is None or device.type == "cpu"


def device_name(device) -> str:
    """``cpu`` or the GPU's name (``NVIDIA H200``), for records and logs."""
    if is_cpu(device):
        return "cpu"
    import torch

    return torch.cuda.get_device_name(device)


def resolve_precision(precision: str, device) -> str:
    """fp32, bf16 or fp16: ``auto`` is fp32 on the CPU, bf16 on a GPU that supports it, else fp16."""
    precision = check_precision(precision)
    if precision != "auto":
        return precision
    if is_cpu(device):
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device, precision: str):
    """Mixed-precision context for inference on ``device`` (a null context for fp32)."""
    import torch

    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return nullcontext()
    kind = "cpu" if is_cpu(device) else device.type
    if not torch.amp.is_autocast_available(kind):  # pragma: no cover - every current torch has cpu/cuda
        raise InvalidInputError(f"torch {torch.__version__} has no autocast on {kind}: use precision fp32")
    return torch.autocast(device_type=kind, dtype=torch.bfloat16 if resolved == "bf16" else torch.float16)


def prepare_cuda() -> None:
    """Speed over bit-reproducibility on the GPU: cuDNN autotuning and TF32 matmuls.

    GPU results then differ from the CPU's in the last bits and may differ between two GPU runs
    (the autotuner's choice of algorithm, atomics in some backward kernels); the CPU path never
    calls this.
    """
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def cuda_stream(device):
    """A fresh CUDA stream for the block (several experts share one GPU); a null context on the CPU."""
    if is_cpu(device):
        return nullcontext()
    import torch

    return torch.cuda.stream(torch.cuda.Stream(device))


@contextmanager
def gpu_memory_guard(device, *, what: str, knob: str, value: int) -> Iterator[None]:
    """Turn torch's out-of-memory error into a DeviceOutOfMemoryError naming ``knob`` and a smaller value."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        if not is_cpu(device) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        where = f"{device} ({device_name(device)})" if not is_cpu(device) else str(device)
        raise DeviceOutOfMemoryError(
            f"out of GPU memory on {where} while {what} with {knob} = {value}: lower {knob} "
            f"(e.g. to {max(1, value // 2)}) and run again") from exc
