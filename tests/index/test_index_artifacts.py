import pytest

from nds.config import Workspace
from nds.index._artifacts import stage_output


def test_stage_output_replaces_the_folder_only_on_success(tmp_path):
    ws = Workspace(tmp_path)
    with stage_output(ws, "cluster") as out:
        (out / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with stage_output(ws, "cluster") as out:
            (out / "a.txt").write_text("v2")
            raise RuntimeError("killed")
    assert (ws.stage_dir("cluster") / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in ws.artifacts_dir.iterdir()) == ["cluster"]
