"""The `device` setting: resolution, precedence, clear errors, autocast, out-of-memory messages.

CI has no GPU: these run on the CPU. Where a test needs "no CUDA" it is skipped on a GPU machine.
"""

import os

import pytest
import yaml

from nds.errors import InvalidInputError, NDSError
from nds.models import device as dv


def _torch():
    import torch

    return torch


no_cuda = pytest.mark.skipif(_torch().cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No NDS_DEVICE from the caller's shell; anything a test (or --device) sets is undone afterwards."""
    monkeypatch.setenv(dv.DEVICE_ENV, "")
    monkeypatch.delenv(dv.DEVICE_ENV)


@pytest.mark.parametrize("value, spec", [("auto", "auto"), ("CPU", "cpu"), (" cuda ", "cuda"), ("cuda:1", "cuda:1")])
def test_device_settings_are_normalised(value, spec):
    assert dv.check_device_spec(value) == spec


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cuda1", "", "mps"])
def test_bad_device_setting_names_the_choices(value):
    with pytest.raises(InvalidInputError, match=r"NDS_DEVICE: .* is not a device; use auto, cpu, cuda or cuda:N"):
        dv.check_device_spec(value, where="NDS_DEVICE")


def test_auto_is_cuda_when_available_else_cpu():
    torch = _torch()
    assert dv.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert dv.resolve_device("cpu") == torch.device("cpu")
    assert dv.pick_device() == dv.resolve_device("auto")  # nothing set: auto


def test_precedence_argument_then_env_then_params(monkeypatch):
    assert dv.device_setting(None, "cpu", where="params.yaml extract.device") == ("cpu", "params.yaml extract.device")
    assert dv.device_setting(None, None) == ("auto", "the default")
    monkeypatch.setenv(dv.DEVICE_ENV, "cuda:0")
    assert dv.device_setting(None, "cpu") == ("cuda:0", "NDS_DEVICE")
    assert dv.device_setting("cpu", "cuda") == ("cpu", "--device")
    monkeypatch.setenv(dv.DEVICE_ENV, "tpu")
    with pytest.raises(InvalidInputError, match="NDS_DEVICE: 'tpu' is not a device"):
        dv.device_setting(None, "cpu")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_error(spec):
    with pytest.raises(dv.DeviceUnavailableError,
                       match=rf"params.yaml extract.device asks for '{spec}' but torch sees no CUDA GPU here .*"
                             "set it to auto or cpu"):
        dv.pick_device(None, spec, where="params.yaml extract.device")


@no_cuda
def test_cuda_from_the_environment_names_the_environment(monkeypatch):
    monkeypatch.setenv(dv.DEVICE_ENV, "cuda")
    with pytest.raises(dv.DeviceUnavailableError, match="NDS_DEVICE asks for 'cuda'"):
        dv.pick_device(None, "cpu")


def test_params_validate_the_device_and_precision(tmp_path):
    from nds.params import Params, load_params

    assert Params().extract.device == "auto" and Params().train_experts.device == "auto"
    f = tmp_path / "params.yaml"
    for section, key, value in [("extract", "device", "gpu"), ("train_experts", "device", "cuda:a"),
                                ("extract", "precision", "int8"), ("extract", "loader_workers", -1)]:
        f.write_text(yaml.safe_dump({section: {key: value}}))
        with pytest.raises(NDSError, match=rf"{section}\.{key}: .*fix the value in params.yaml"):
            load_params(f)
    f.write_text(yaml.safe_dump({"extract": {"device": "CUDA:1", "precision": "BF16"}}))
    p = load_params(f)
    assert (p.extract.device, p.extract.precision) == ("cuda:1", "bf16")


def test_the_device_keys_leave_cache_keys_and_the_bundle_alone():
    """CPU byte-identity: the runtime fields are not part of what determines an output."""
    from nds.params import RUNTIME_FIELDS, ExtractParams, TrainExpertsParams

    assert ExtractParams(device="cuda", precision="fp16", loader_workers=9).model_dump(exclude=RUNTIME_FIELDS) == \
        {"extractor": "efficientnet_lite0", "image_size": 64, "batch_size": 128, "weights": None}
    assert "device" not in TrainExpertsParams(device="cuda").model_dump(exclude=RUNTIME_FIELDS)


def test_precision_auto_is_fp32_on_the_cpu_and_autocast_is_then_a_no_op():
    torch = _torch()
    cpu = torch.device("cpu")
    assert dv.resolve_precision("auto", cpu) == "fp32"
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with dv.autocast(cpu, "auto"):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(InvalidInputError, match="not a precision"):
        dv.resolve_precision("half", cpu)


def test_autocast_on_the_cpu_when_asked():
    torch = _torch()
    if not torch.amp.is_autocast_available("cpu"):
        pytest.skip("this torch has no CPU autocast")
    cpu = torch.device("cpu")
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with dv.autocast(cpu, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # only inside the block


def test_out_of_memory_names_the_batch_size_to_lower():
    torch = _torch()
    with pytest.raises(dv.DeviceOutOfMemoryError,
                       match=r"out of GPU memory on cpu while extracting features with extract.batch_size = 512: "
                             r"lower extract.batch_size \(e.g. to 256\)") as info:
        with dv.gpu_memory_guard(torch.device("cpu"), what="extracting features", knob="extract.batch_size", value=512):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert isinstance(info.value, NDSError) and isinstance(info.value.__cause__, torch.OutOfMemoryError)
    with pytest.raises(ValueError, match="unrelated"):  # other errors pass through untouched
        with dv.gpu_memory_guard(torch.device("cpu"), what="x", knob="k", value=1):
            raise ValueError("unrelated")


def test_device_names_and_streams_on_the_cpu():
    torch = _torch()
    cpu = torch.device("cpu")
    assert dv.device_name(cpu) == dv.device_name(None) == "cpu" and dv.is_cpu(None)
    with dv.cuda_stream(cpu):  # a null context: nothing to switch
        pass


# --------------------------------------------------------------------------- the CLI


def test_cli_device_option_is_validated_by_the_parser(capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["stage", "extract", "--device", "gpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'gpu' is not a device; use auto, cpu, cuda or cuda:N" in err and "Traceback" not in err


@no_cuda
@pytest.mark.parametrize("argv", [
    ["stage", "extract", "--device", "cuda"],
    ["index", "--profile", "tiny", "--device", "cuda:1"],
    ["client", "score", "--experts", "/nonexistent", "--data", "/nonexistent", "--out", "/tmp/x.json", "--device", "cuda"],
    ["evaluate", "--task", "digits", "--budget", "0.1", "--device", "cuda"],
])
def test_cli_cuda_without_cuda_fails_first_with_one_line(argv, capsys, tmp_path):
    from flows.cli import main

    (tmp_path / "keep.txt").write_text("stored")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["--root", str(tmp_path), "-q", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device asks for 'cuda") and "no CUDA GPU" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before and os.environ.get(dv.DEVICE_ENV) is None


def test_cli_device_option_exports_the_setting(monkeypatch):
    dv.apply_device_option("cpu")
    assert os.environ[dv.DEVICE_ENV] == "cpu"
    dv.apply_device_option(None)  # no option: the environment is left as it is
    assert os.environ[dv.DEVICE_ENV] == "cpu"


# --------------------------------------------------------------------------- evaluation training


def test_evaluation_training_loop_is_seeded_on_every_device():
    """One loop serves CPU and GPU; its batches and shifts come only from `seed` (a CPU
    generator), so the same seed gives the same weights and another seed other weights."""
    import numpy as np

    torch = _torch()
    from nds.evaluate.training import _train_loop, build_model
    from nds.models.experts import preprocess

    rng = np.random.default_rng(0)
    x = preprocess(rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, 3, 40).astype(np.int64))
    out = []
    for seed in (1, 1, 2):
        torch.manual_seed(0)
        model = build_model(3, width=8)
        loss = _train_loop(model, model.parameters(), x, y, steps=5, batch=16, lr=0.01, seed=seed, desc="t",
                           progress=False, weight_decay=5e-4)
        out.append((loss, [p.detach().clone() for p in model.state_dict().values()]))
    assert out[0][0] == out[1][0]
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
    assert not all(torch.equal(a, b) for a, b in zip(out[0][1], out[2][1]))


def test_pretrain_and_finetune_take_a_cpu_device_as_the_cpu_path():
    import numpy as np

    torch = _torch()
    from nds.evaluate.training import TrainConfig, finetune_and_test, pretrain

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (30, 32, 32, 3), dtype=np.uint8)
    labels = np.array(["a", "b", "c"] * 10)
    cfg = TrainConfig(pretrain_epochs=None, pretrain_steps=3, finetune_steps=3, width=4)
    a = pretrain(imgs, labels, config=cfg, seed=0)
    b = pretrain(imgs, labels, config=cfg, seed=0, device=torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert finetune_and_test(a, imgs, labels, imgs, labels, config=cfg) == \
        finetune_and_test(a, imgs, labels, imgs, labels, config=cfg, device=torch.device("cpu"))


# --------------------------------------------------------------------------- the benchmark


def test_device_benchmark_smoke(tmp_path):
    """benchmarks/device_throughput.py at toy sizes, so it cannot rot; without a GPU its column says so."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "dev.json"
    r = subprocess.run([sys.executable, str(repo / "benchmarks/device_throughput.py"), "--sizes", "32", "--images", "16",
                        "--batch", "8", "--steps", "1", "--concurrent", "2", "--repeats", "1", "--out", str(out)],
                       cwd=repo, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert [row["figure"] for row in doc["rows"]][:2] == ["extraction img/s, 32 px", "expert training img/s (steps), 32 px"]
    assert all(row["cpu"] > 0 for row in doc["rows"])
    if not _torch().cuda.is_available():
        assert doc["gpu"] is None and all(row["gpu"] is None for row in doc["rows"])
        assert "| no GPU on this machine |" in r.stdout
