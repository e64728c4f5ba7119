"""Target tasks: built-in held-out tasks and their input checks."""

from __future__ import annotations

import pytest

from nds.errors import NDSError
from nds.evaluate.tasks import build_target_task


def test_unknown_task_lists_the_valid_ones(tmp_path):
    from nds.config import Workspace

    with pytest.raises(NDSError, match="digits.*clothing.*letters"):
        build_target_task(Workspace(tmp_path), "cifar")
