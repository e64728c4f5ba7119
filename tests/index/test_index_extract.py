import pytest

from nds.config import Workspace
from nds.errors import NDSError
from nds.index.extract import EXTRACT_CACHE, extract_shard, finish_extract, plan_extract, run_extract


def _cached(ws) -> list:
    """The cached feature shards (each has its corpus-format pixels beside it, `<key>.pixels.npy`)."""
    files = sorted((ws.artifacts_dir / EXTRACT_CACHE).glob("*.npy"))
    features = [p for p in files if not p.name.endswith(".pixels.npy")]
    assert len(files) == 2 * len(features)
    return features


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
    assert len(_cached(ws)) == 2
    stats = run_extract(ws, params, shard_batches=4)
    assert stats["shards"] == len(plan) and stats["shards_reused"] == 2
    assert np.array_equal(np.load(ws.stage_dir("extract") / "features.npy"), one_pass)
    # After success the cache holds exactly this index's shards (the next run after `nds source add`
    # extracts only the new source); a stale shard is pruned.
    assert len(_cached(ws)) == len(plan)
    stale = ws.artifacts_dir / EXTRACT_CACHE / "stale.npy"
    np.save(stale, np.zeros((1, 1)))
    run_extract(ws, params, shard_batches=4)
    assert not stale.exists() and len(_cached(ws)) == len(plan)
    with pytest.raises(NDSError, match="do not cover"):
        finish_extract(ws, params, [])


def _copy(tiny_index, tmp_path):
    import shutil

    src, _ = tiny_index
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src.root, ws.root, ignore=shutil.ignore_patterns("*.duckdb*", ".cache"))
    return ws


def test_device_path_reads_batches_in_workers_and_keys_its_shards_apart(tiny_index, tmp_path):
    """The accelerated path (DataLoader worker processes, autocast) on the CPU with precision bf16:
    features of the same rows, close to the fp32 ones, cached under their own key; the default
    CPU path is untouched by it and still equals the index's features bit for bit."""
    import numpy as np

    from nds.params import load_params

    ws = _copy(tiny_index, tmp_path)
    params = load_params(ws.params_path)
    one_pass = np.load(ws.stage_dir("extract") / "features.npy")
    bf16 = params.model_copy(update={"extract": params.extract.model_copy(
        update={"device": "cpu", "precision": "bf16", "loader_workers": 2})})
    (a, b), *_ = plan_extract(ws, bf16, shard_batches=2)
    dev = extract_shard(ws, bf16, a, b)
    assert (dev["device"], dev["precision"], dev["reused"]) == ("cpu", "bf16", False)
    got = np.load(dev["file"])
    assert got.shape == one_pass[a:b].shape and got.dtype == np.float16
    assert not np.array_equal(got, one_pass[a:b])
    assert np.corrcoef(got.astype(np.float32).ravel(), one_pass[a:b].astype(np.float32).ravel())[0, 1] > 0.99
    cpu = extract_shard(ws, params, a, b)
    assert cpu["file"] != dev["file"] and cpu["precision"] == "fp32"
    assert np.array_equal(np.load(cpu["file"]), one_pass[a:b])
    assert extract_shard(ws, bf16, a, b)["reused"]


def _daemon_workers(q):
    from nds.index.extract import loader_workers

    q.put(loader_workers(4))


def test_no_dataloader_processes_inside_a_daemonic_process():
    """Dask's nanny runs workers as daemonic processes, which may not fork: read in-process there."""
    from nds.index.extract import _reader_context, available_cpus, loader_workers

    cpus = available_cpus()
    assert loader_workers(4) == min(4, cpus) and loader_workers(0) == 0 and loader_workers(64) == cpus
    ctx = _reader_context()  # not a fork of this threaded process (see the next test)
    q = ctx.Queue()
    p = ctx.Process(target=_daemon_workers, args=(q,), daemon=True)
    p.start()
    p.join(60)
    assert q.get(timeout=5) == 0


def test_readers_do_not_inherit_a_lock_another_thread_holds(tmp_path):
    """A reader is not a fork of this process: a lock another thread holds here (a module being
    imported, glibc's atexit list while torch starts its thread pool) cannot hang it.

    Forked from this process, the reader below waits forever for the import lock of ``slowmod``,
    which a thread here holds; started as readers are, it imports the module itself.
    """
    import os
    import sys
    import threading

    from nds.index.extract import _reader_context

    release = tmp_path / "release"
    release.touch()
    (tmp_path / "slowmod.py").write_text(
        "import os, time\n"
        f"while os.getpid() == {os.getpid()} and os.path.exists({str(release)!r}):\n"
        "    time.sleep(0.01)\n")
    importing = threading.Thread(target=lambda: __import__("slowmod"), daemon=True)
    sys_path = str(tmp_path)
    sys.path.insert(0, sys_path)
    try:
        importing.start()
        while "slowmod" not in sys.modules:  # the thread holds the module's import lock from here on
            pass
        reader = _reader_context().Process(target=exec, args=(f"import sys; sys.path.insert(0, {sys_path!r}); "
                                                              "import slowmod",))
        reader.start()
        reader.join(30)
        hung = reader.is_alive()
        if hung:
            reader.kill()
        assert not hung and reader.exitcode == 0
    finally:
        release.unlink()
        importing.join(10)
        sys.path.remove(sys_path)
        sys.modules.pop("slowmod", None)
