import pytest
import yaml

from nds.config import Workspace
from nds.errors import InvalidInputError, NDSError
from nds.params import load_params


def test_repository_params_yaml_is_valid():
    root = Workspace.from_env(__file__ + "/../..").root
    p = load_params(root / "params.yaml")
    assert p.cluster.k >= 1 and p.extract.extractor


def test_bad_value_names_the_key(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("cluster:\n  k: 0\n")
    with pytest.raises(NDSError, match="cluster.k"):
        load_params(f)


def test_unknown_key_is_refused(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("cluster:\n  kk: 3\n")
    with pytest.raises(NDSError, match="cluster.kk"):
        load_params(f)


def test_missing_file(tmp_path):
    with pytest.raises(NDSError, match="not found"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("section, match", [
    ({"index_cron": "every sunday"}, "schedule.index_cron.*5-field cron"),
    ({"index_cron": "0 3 * *"}, "schedule.index_cron"),
    ({"timezone": "Mars/Olympus"}, "schedule.timezone.*unknown time zone"),
    ({"active": "sometimes"}, "schedule.active"),
])
def test_bad_schedule_is_refused(tmp_path, section, match):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"schedule": section}))
    with pytest.raises(NDSError, match=match):
        load_params(path)


@pytest.mark.parametrize("section, key, value, match", [
    ("extract", "extractor", "clip", "unknown extractor 'clip': choose one of efficientnet_lite0"),
    ("cluster", "method", "spectral", "unknown clustering method 'spectral': choose one of kmeans, dataset-kmeans"),
    ("train_experts", "arch", "vit", "unknown expert architecture 'vit': choose one of rotnet_small"),
    ("compute_weights", "scheme", "magic", "unknown weight scheme 'magic': choose one of inverse_cluster_size"),
])
def test_strategy_names_are_checked_against_their_registry(tmp_path, section, key, value, match):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({section: {key: value}}))
    with pytest.raises(InvalidInputError, match=f"{section}.{key}: .*{match}") as err:
        load_params(path)
    assert "\n" not in str(err.value)  # one line for the CLI


def test_every_registered_strategy_is_accepted(tmp_path):
    from nds._registry import CLUSTERERS, EXPERT_ARCHS, EXTRACTORS, WEIGHT_SCHEMES

    path = tmp_path / "params.yaml"
    for section, key, registry in [("extract", "extractor", EXTRACTORS), ("cluster", "method", CLUSTERERS),
                                   ("train_experts", "arch", EXPERT_ARCHS),
                                   ("compute_weights", "scheme", WEIGHT_SCHEMES)]:
        for name in registry.names():
            path.write_text(yaml.safe_dump({section: {key: name}}))
            assert getattr(getattr(load_params(path), section), key) == name
