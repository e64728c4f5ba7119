import pytest

from nds.config import Workspace
from nds.errors import NDSError
from nds.index.stages import run_stage


def test_missing_upstream_artifact_names_the_stage(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(NDSError, match="`extract` stage"):
        run_stage("cluster", Workspace(tmp_path))


def test_unknown_stage(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(NDSError, match="choose one of"):
        run_stage("nope", Workspace(tmp_path))


def test_missing_corpus_says_how_to_build_it(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    with pytest.raises(NDSError, match="nds corpus build"):
        run_stage("extract", Workspace(tmp_path))


def test_dvc_yaml_runs_every_stage_on_its_own_code():
    """Each dvc.yaml stage runs `nds stage NAME` and depends on its own module, not on the others'."""
    from pathlib import Path

    import yaml

    from nds.index.stages import STAGES

    repo = Path(__file__).resolve().parents[2]
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert tuple(stages) == STAGES
    module = {"extract": "extract", "cluster": "cluster", "train_experts": "experts", "compute_weights": "weights"}
    for name, stage in stages.items():
        assert stage["cmd"] == f"nds -q stage {name}"
        code = [d for d in stage["deps"] if d.endswith((".py", ".sql"))]
        assert all((repo / d).is_file() for d in code), code
        own = [d for d in code if d.startswith("nds/index/") and d != "nds/index/_artifacts.py"]
        assert own[0] == f"nds/index/{module[name]}.py"
        assert not any(d.startswith("nds/select/") or d == "nds/index/stages.py" for d in code)
