import numpy as np
import pytest

from nds._registry import EXTRACTORS
from nds.errors import InvalidInputError, NDSError
from nds.models.extractors import compute_features, load_extractor
from nds.params import ExtractParams


def test_registry_names_the_choices():
    # params validation refuses unknown names; direct callers that skip it get the same error
    with pytest.raises(NDSError, match="efficientnet_lite0"):
        load_extractor(ExtractParams.model_construct(extractor="clip"))
    with pytest.raises(InvalidInputError, match="unknown extractor 'clip': choose one of efficientnet_lite0"):
        EXTRACTORS["clip"]
    assert EXTRACTORS.names() == ["efficientnet_lite0", "torchvision_resnet18", "torchvision_resnet50",
                                  "torchvision_mobilenet_v3_small"]


def test_torchvision_backbone_needs_local_weights(tmp_path):
    with pytest.raises(NDSError, match="never downloads"):
        load_extractor(ExtractParams(extractor="torchvision_resnet18"))
    with pytest.raises(NDSError, match="does not exist"):
        load_extractor(ExtractParams(extractor="torchvision_resnet18", weights=str(tmp_path / "none.pt")))


def test_torchvision_backbone_with_a_local_state_dict(tmp_path):
    import torch
    import torchvision

    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    ex = load_extractor(ExtractParams(extractor="torchvision_resnet18", weights=str(path), image_size=32))
    assert ex(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 512)


def test_efficientnet_features_are_deterministic_and_shaped():
    ex = load_extractor(ExtractParams(image_size=32))
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    a, b = ex(imgs), ex(imgs)
    assert a.shape == (3, 1280) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # batch composition does not change a sample's features (eval mode, no batch statistics)
    np.testing.assert_allclose(ex(imgs[:1])[0], a[0], rtol=1e-4, atol=1e-4)


def test_bad_image_array_is_a_clear_error():
    ex = load_extractor(ExtractParams(image_size=32))
    with pytest.raises(NDSError, match="uint8"):
        ex(np.zeros((2, 32, 32), np.float32))


class _Fake:
    name, dim, image_size = "fake", 4, 32

    def __call__(self, images):
        return images.reshape(len(images), -1)[:, :4].astype(np.float32)


def test_compute_features_streams_into_a_float16_file(tmp_path):
    batches = (np.full((2, 32, 32, 3), i, np.uint8) for i in range(3))
    stats = compute_features(batches, 6, tmp_path / "f.npy", extractor=_Fake())
    f = np.load(tmp_path / "f.npy")
    assert f.dtype == np.float16 and f.shape == (6, 4)
    np.testing.assert_array_equal(f[:, 0], [0, 0, 1, 1, 2, 2])
    assert stats["n_samples"] == 6


def test_compute_features_leaves_nothing_on_failure(tmp_path):
    def batches():
        yield np.zeros((2, 32, 32, 3), np.uint8)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        compute_features(batches(), 4, tmp_path / "f.npy", extractor=_Fake())
    assert list(tmp_path.iterdir()) == []


def test_compute_features_checks_the_count(tmp_path):
    with pytest.raises(NDSError, match="catalog lists 5"):
        compute_features(iter([np.zeros((2, 32, 32, 3), np.uint8)]), 5, tmp_path / "f.npy", extractor=_Fake())
    assert list(tmp_path.iterdir()) == []
