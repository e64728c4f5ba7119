"""The networks' device paths, exercised on the CPU (CI has no GPU).

The accelerated code (the extractor's device path, the GPU expert trainer, scoring on a device)
takes a ``torch.device``; given the CPU it runs the very code a GPU would, so these tests check
its arithmetic against the CPU path it must mirror.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from nds.models import experts
from nds.models.expert_gpu import train_expert_on_device
from nds.models.extractors import load_extractor
from nds.params import ExtractParams

from modelfixtures import digits_like

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def extractor():
    return load_extractor(ExtractParams(image_size=32))


def _images(n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)




def test_cpu_at_fp32_is_todays_extractor_unchanged(extractor):
    assert extractor.to(CPU, "auto") is extractor and extractor.to(CPU, "fp32") is extractor
    assert not extractor.accelerated


def test_the_device_path_computes_what_the_cpu_path_computes(extractor):
    """Upload, resize and normalise on the device are the CPU's operations: equal at fp32."""
    imgs = _images()
    on_device = replace(extractor, device=CPU, precision="fp32")
    np.testing.assert_array_equal(on_device(imgs), extractor(imgs))
    np.testing.assert_array_equal(on_device(torch.from_numpy(imgs)), extractor(imgs))  # DataLoader batches


def test_reduced_precision_on_the_cpu_is_autocast(extractor):
    if not torch.amp.is_autocast_available("cpu"):
        pytest.skip("this torch has no CPU autocast")
    imgs = _images()
    ref = extractor(imgs)
    bf16 = load_extractor(ExtractParams(image_size=32)).to(CPU, "bf16")
    assert bf16.accelerated and bf16.precision == "bf16" and not bf16.channels_last
    out = bf16(imgs)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert not np.array_equal(out, ref)  # it really ran in bf16
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99
    with pytest.raises(Exception, match="uint8"):
        bf16(np.zeros((2, 32, 32), np.float32))


def test_gpu_expert_recipe_mirrors_the_cpu_recipe():
    """Same split, batches, flips, optimiser and schedule: after a few steps the weights agree
    to float rounding (fused AdamW, device-side preprocessing); the model comes back on the CPU."""
    imgs = digits_like()
    kw = dict(arch="rotnet_small", epochs=30, max_steps=3, batch_size=32, lr=0.01, val_fraction=0.1, seed=3)
    m_cpu, met_cpu = experts.train_expert(imgs, **kw)
    m_dev, met_dev = train_expert_on_device(imgs, device=CPU, **kw)
    assert next(m_dev.parameters()).device == CPU and not m_dev.training
    for (name, a), b in zip(m_cpu.state_dict().items(), m_dev.state_dict().values()):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert met_dev["steps"] == met_cpu["steps"] == 3 and met_dev["n_val"] == met_cpu["n_val"]
    assert set(met_dev) == set(met_cpu)


def test_gpu_expert_recipe_learns_and_saves_like_a_cpu_expert(tmp_path):
    imgs = digits_like()
    model, metrics = experts.train_expert(imgs, epochs=30, max_steps=60, batch_size=32, lr=0.01, seed=3, device=None)
    dev_model, dev_metrics = train_expert_on_device(imgs, arch="rotnet_small", epochs=30, max_steps=60, batch_size=32,
                                                    lr=0.01, val_fraction=0.1, seed=3, device=CPU)
    assert dev_metrics["rotation_accuracy"] > 0.6  # chance is 0.25
    sha = experts.save_expert(dev_model, tmp_path / "expert_000.pt", meta={"arch": "rotnet_small", "expert": 0})
    loaded, meta = experts.load_expert(tmp_path / "expert_000.pt", expected_sha256=sha)
    assert meta["expert"] == 0
    assert experts.rotation_accuracy(loaded, imgs) == experts.rotation_accuracy(dev_model, imgs)


def test_empty_cluster_on_the_device_path_is_a_clear_error():
    with pytest.raises(Exception, match="empty cluster"):
        train_expert_on_device(np.zeros((0, 32, 32, 3), np.uint8), arch="rotnet_small", epochs=1, max_steps=1,
                               batch_size=4, lr=0.01, val_fraction=0.1, seed=0, device=CPU)


def test_rotation_accuracy_and_client_features_on_a_device_equal_the_cpu():
    from nds.client.scoring import compute_features

    torch.manual_seed(0)
    model = experts.build_expert("rotnet_small").eval()
    imgs = _images(40)
    assert experts.rotation_accuracy(model, imgs, device=CPU) == experts.rotation_accuracy(model, imgs)
    assert experts.rotation_confidence(model, imgs, device=CPU) == pytest.approx(
        experts.rotation_confidence(model, imgs), rel=1e-6)
    np.testing.assert_array_equal(compute_features(model, imgs, device=CPU), compute_features(model, imgs))


def test_normalise_is_preprocess_on_a_tensor():
    imgs = _images(3)
    torch.testing.assert_close(experts.normalise(torch.from_numpy(imgs)), experts.preprocess(imgs), rtol=0, atol=0)
    x, y = experts.rotate_batch(experts.preprocess(imgs))
    assert y.device == x.device and y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
