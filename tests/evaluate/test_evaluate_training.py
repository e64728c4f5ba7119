"""The pre-training schedule and the fine-tuning recipe."""

from __future__ import annotations

import numpy as np
import pytest

from nds.errors import NDSError
from nds.evaluate.request import quick_request
from nds.evaluate.training import TrainConfig, finetune_and_test, pretrain, pretrain_schedule


def test_pretrain_schedule_is_epochs_clamped_to_floor_and_cap():
    cfg = TrainConfig()  # 30 epochs of batch 128, clamped to [300, 3600] steps
    assert pretrain_schedule(448, cfg) == 300
    assert pretrain_schedule(2240, cfg) == 525
    assert pretrain_schedule(4480, cfg) == 1050
    assert pretrain_schedule(22402, cfg) == 3600
    fixed = TrainConfig(pretrain_epochs=None, pretrain_steps=150)
    assert pretrain_schedule(10, fixed) == pretrain_schedule(10**6, fixed) == 150
    assert pretrain_schedule(10, TrainConfig(pretrain_steps=20)) == 20  # floor <= cap
    assert quick_request().train.pretrain_epochs is None


def test_finetune_rejects_test_classes_without_training_images():
    x = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(NDSError, match="test set"):
        finetune_and_test(None, x, np.array(["a", "b", "a", "b"]), x, np.array(["a", "c", "a", "b"]))


def test_finetune_does_not_modify_the_pretrained_model():
    import torch

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    y = np.array(["a", "b"] * 8)
    cfg = TrainConfig(pretrain_steps=2, finetune_steps=2, pretrain_batch=8, finetune_batch=8)
    model = pretrain(x, y, config=cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = finetune_and_test(model, x, y, x, y, config=cfg)
    assert 0 <= acc <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
