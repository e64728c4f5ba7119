import pytest

from nds.index import stages as pipeline
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


def test_sharded_extraction_resumes_and_equals_one_pass(tiny_index, tmp_path):
    """Shards fall on batch boundaries: 4 shards give the features of the index's single pass;
    after an interruption, the rerun reuses finished shards and computes only the rest."""
    import shutil

    import numpy as np

    from nds.params import load_params

    src, _ = tiny_index
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src.root, ws.root, ignore=shutil.ignore_patterns("*.duckdb*", ".cache"))
    params = load_params(ws.params_path)
    one_pass = np.load(ws.stage_dir("extract") / "features.npy")
    plan = pipeline.plan_extract(ws, params, shard_batches=4)
    assert len(plan) >= 3 and plan[0][0] == 0 and plan[-1][1] == one_pass.shape[0]
    # "Killed" after two shards: their files are in the cache, the stage output is untouched.
    for a, b in plan[:2]:
        pipeline.extract_shard(ws, params, a, b)
    assert len(list((ws.artifacts_dir / pipeline.EXTRACT_CACHE).glob("*.npy"))) == 2
    stats = pipeline.run_extract(ws, params, shard_batches=4)
    assert stats["shards"] == len(plan) and stats["shards_reused"] == 2
    assert np.array_equal(np.load(ws.stage_dir("extract") / "features.npy"), one_pass)
    assert not list((ws.artifacts_dir / pipeline.EXTRACT_CACHE).glob("*.npy")), "cache cleared after success"
    with pytest.raises(NDSError, match="do not cover"):
        pipeline.finish_extract(ws, params, [])


def test_dataset_kmeans_stage_keeps_every_cluster_inside_one_dataset(tiny_index, tmp_path):
    """The default clustering: k-means inside each source dataset, K split over them by size."""
    import json
    import shutil

    import numpy as np
    import yaml

    src, _ = tiny_index
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src.root, ws.root, ignore=shutil.ignore_patterns("*.duckdb*", ".cache"))
    params = yaml.safe_load(ws.params_path.read_text())
    params["cluster"].update(method="dataset-kmeans", k=12)
    ws.params_path.write_text(yaml.safe_dump(params))
    summary = pipeline.run_stage("cluster", ws, progress=False)
    assert summary["method"] == "dataset-kmeans" and summary["k"] == 12
    mixes = json.loads((ws.stage_dir("cluster") / "clusters.json").read_text())["dataset_mix"]
    assert all(len(mix) == 1 for mix in mixes)  # no cluster straddles two datasets
    n_datasets = len({d for mix in mixes for d in mix})
    assert n_datasets >= 3 and len(mixes) > n_datasets  # some dataset was split by k-means
    assignments = np.load(ws.stage_dir("cluster") / "assignments.npy")
    assert np.bincount(assignments, minlength=12).sum() == len(assignments) and assignments.max() == 11
    # k below the number of datasets: a clear error, and the stage output is left as it was
    params["cluster"]["k"] = n_datasets - 1
    ws.params_path.write_text(yaml.safe_dump(params))
    with pytest.raises(NDSError, match=f"k >= {n_datasets}"):
        pipeline.run_stage("cluster", ws, progress=False)
    assert np.array_equal(np.load(ws.stage_dir("cluster") / "assignments.npy"), assignments)
