import json

import numpy as np
import pytest

from nds._io import file_sha256
from nds.errors import InvalidInputError, NDSError
from nds.formats.bundle import load_bundle, write_bundle
from nds.models import experts

from modelfixtures import digits_like




def test_rotate_batch_labels_and_shapes():
    import torch

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    rx, y = experts.rotate_batch(x)
    assert rx.shape == (8, 3, 4, 4)
    assert y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(rx[2], torch.rot90(x[0], 1, dims=(1, 2)))


def test_training_learns_rotation_and_is_deterministic():
    imgs = digits_like()
    m1, metrics = experts.train_expert(imgs, epochs=30, max_steps=60, batch_size=32, lr=0.01, seed=3)
    assert metrics["rotation_accuracy"] > 0.6  # chance is 0.25
    m2, metrics2 = experts.train_expert(imgs, epochs=30, max_steps=60, batch_size=32, lr=0.01, seed=3)
    assert metrics2["final_loss"] == metrics["final_loss"]


def test_empty_cluster_is_a_clear_error():
    with pytest.raises(NDSError, match="empty cluster"):
        experts.train_expert(np.zeros((0, 32, 32, 3), np.uint8))


def test_wrong_image_shape_is_a_clear_error():
    with pytest.raises(NDSError, match=r"\(n, 32, 32, 3\)"):
        experts.preprocess(np.zeros((2, 28, 28), np.uint8))


def test_bundle_round_trip_and_tamper_detection(tmp_path):
    model, metrics = experts.train_expert(digits_like(16), max_steps=2, batch_size=8)
    entries = []
    for k in range(2):
        f = f"expert_{k:03d}.pt"
        sha = experts.save_expert(model, tmp_path / f, meta={"arch": "rotnet_small", "expert": k})
        entries.append({"expert": k, "file": f, "sha256": sha, **metrics})
    bundle = write_bundle(tmp_path, index_version="v1", network=experts.bundle_fields("rotnet_small"), experts=entries)
    assert load_bundle(tmp_path)["bundle_sha256"] == bundle["bundle_sha256"]
    m, meta = experts.load_expert(tmp_path / "expert_001.pt", expected_sha256=entries[1]["sha256"])
    assert meta["expert"] == 1

    (tmp_path / "expert_001.pt").write_bytes(b"garbage")
    with pytest.raises(NDSError, match="tampered or corrupt"):
        load_bundle(tmp_path)
    (tmp_path / "expert_000.pt").unlink()
    with pytest.raises(NDSError, match="missing"):
        load_bundle(tmp_path)

    doc = json.loads((tmp_path / "bundle.json").read_text())
    doc["index_version"] = "forged"
    (tmp_path / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(NDSError, match="checksum mismatch"):
        load_bundle(tmp_path, verify=False)


def test_identical_experts_have_identical_files(tmp_path):
    """Index versions are content ids: the same training must give the same bytes."""
    shas = []
    for name in ("a", "b"):
        model, _ = experts.train_expert(digits_like(16), max_steps=2, batch_size=8, seed=1)
        shas.append(experts.save_expert(model, tmp_path / name / "expert_000.pt", meta={"arch": "rotnet_small", "expert": 0}))
    assert shas[0] == shas[1]
    assert file_sha256(tmp_path / "a" / "expert_000.pt") == shas[0]


def test_unknown_architecture_names_the_choices():
    with pytest.raises(InvalidInputError, match=r"unknown expert architecture 'resnet9': choose one of rotnet_small"):
        experts.build_expert("resnet9")


def test_bundle_fields_describe_the_network():
    assert experts.bundle_fields("rotnet_small") == {
        "architecture": "rotnet_small", "input_size": 32, "feature_dim": 128, "preprocessing": experts.PREPROCESSING,
    }
