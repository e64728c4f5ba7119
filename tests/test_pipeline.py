import pytest

from nds import pipeline
from nds.config import Workspace
from nds.errors import NDSError


def test_stage_output_replaces_the_folder_only_on_success(tmp_path):
    ws = Workspace(tmp_path)
    with pipeline.stage_output(ws, "cluster") as out:
        (out / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with pipeline.stage_output(ws, "cluster") as out:
            (out / "a.txt").write_text("v2")
            raise RuntimeError("killed")
    assert (ws.stage_dir("cluster") / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in ws.artifacts_dir.iterdir()) == ["cluster"]


def test_missing_upstream_artifact_names_the_stage(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(NDSError, match="`extract` stage"):
        pipeline.run_stage("cluster", Workspace(tmp_path))


def test_unknown_stage(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(NDSError, match="choose one of"):
        pipeline.run_stage("nope", Workspace(tmp_path))


def test_missing_corpus_says_how_to_build_it(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(NDSError, match="nds corpus build"):
        pipeline.run_stage("extract", Workspace(tmp_path))
