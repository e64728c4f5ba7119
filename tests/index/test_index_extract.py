import pytest

from nds.config import Workspace
from nds.errors import NDSError
from nds.index.extract import EXTRACT_CACHE, extract_shard, finish_extract, plan_extract, run_extract


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
    plan = plan_extract(ws, params, shard_batches=4)
    assert len(plan) >= 3 and plan[0][0] == 0 and plan[-1][1] == one_pass.shape[0]
    # "Killed" after two shards: their files are in the cache, the stage output is untouched.
    for a, b in plan[:2]:
        extract_shard(ws, params, a, b)
    assert len(list((ws.artifacts_dir / EXTRACT_CACHE).glob("*.npy"))) == 2
    stats = run_extract(ws, params, shard_batches=4)
    assert stats["shards"] == len(plan) and stats["shards_reused"] == 2
    assert np.array_equal(np.load(ws.stage_dir("extract") / "features.npy"), one_pass)
    assert not list((ws.artifacts_dir / EXTRACT_CACHE).glob("*.npy")), "cache cleared after success"
    with pytest.raises(NDSError, match="do not cover"):
        finish_extract(ws, params, [])
