"""Experts and extraction shards run on a Dask cluster (NDS_DASK_ADDRESS) give bit-identical results
to a sequential run.

One Dask worker thread: nds.models.experts seeds torch's *global* RNG before building each model, so
two experts initialised at the same moment in one process race for it (thread pool and
in-process Dask alike); until that is seeded per call, only one-at-a-time runs compare exactly.
"""

from __future__ import annotations

import shutil

import yaml

from nds.formats.bundle import load_bundle
def _copy_without_experts(src, dst):
    # No trained experts and no resume cache: every expert is trained again.
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("experts", ".cache", "*.duckdb*"))
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["train_experts"]["workers"] = 1
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


def test_dask_task_runner_gives_identical_experts(tiny_index, tmp_path, monkeypatch):
    from distributed import LocalCluster
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows._common import task_runner
    from flows.train_experts import train_experts_with_workers

    src, _ = tiny_index
    monkeypatch.delenv("NDS_DASK_ADDRESS", raising=False)
    assert isinstance(task_runner(1), ThreadPoolTaskRunner)
    sequential = train_experts_with_workers(str(_copy_without_experts(src.root, tmp_path / "seq")))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        monkeypatch.setenv("NDS_DASK_ADDRESS", cluster.scheduler_address)
        assert type(task_runner(1)).__name__ == "DaskTaskRunner"
        on_dask = train_experts_with_workers(str(_copy_without_experts(src.root, tmp_path / "dask")))
    assert [e["sha256"] for e in on_dask["experts"]] == [e["sha256"] for e in sequential["experts"]]
    assert load_bundle(tmp_path / "dask" / "artifacts" / "experts", verify=True)["k"] == len(on_dask["experts"])


def test_extraction_shards_on_dask_equal_the_single_pass(tiny_index, tmp_path, monkeypatch):
    import numpy as np
    from distributed import LocalCluster

    from flows.extract import extract_with_runner

    src, _ = tiny_index
    root = tmp_path / "ws"
    shutil.copytree(src.root, root, ignore=shutil.ignore_patterns("extract", ".cache", "*.duckdb*"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        monkeypatch.setenv("NDS_DASK_ADDRESS", cluster.scheduler_address)
        stats = extract_with_runner(str(root), shard_batches=4)
    assert stats["shards"] >= 3 and stats["shards_reused"] == 0
    assert np.array_equal(np.load(root / "artifacts" / "extract" / "features.npy"),
                          np.load(src.stage_dir("extract") / "features.npy"))
