"""``train_experts.image_size``: experts trained at another size from the originals, and clients scoring at it.

The default (32) keeps the extract stage's pixels, the experts' keys and the bundle's bytes; another
size decodes the index rows' originals in DataLoader reader processes into a per-cluster pixels
cache, writes its size into bundle.json, and the client decodes its own files again at that size.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from nds.client.images import ClientData, client_images_at, load_client_images
from nds.client.scoring import score_experts
from nds.config import Workspace
from nds.corpus.decode import decode_image, to_array
from nds.corpus.read import decode_object, resolve_uri
from nds.errors import InvalidInputError, NDSError
from nds.formats.bundle import BUNDLE_FILE, bundle_checksum, load_bundle
from nds.index import experts as stage
from nds.index._artifacts import load_assignments, load_index_order
from nds.index.stages import run_stage
from nds.models.experts import load_expert
from nds.params import Params, load_params
from conftest import TINY_PARAMS

SIZE = 48


def _copy_at(tiny_index, tmp_path, size: int) -> Workspace:
    """A copy of the tiny index whose params.yaml trains experts at ``size`` px (2 reader processes)."""
    src, _ = tiny_index
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src.root, ws.root, ignore=shutil.ignore_patterns("*.duckdb*"))
    params = yaml.safe_load(ws.params_path.read_text())
    params["train_experts"].update(image_size=size, loader_workers=2)
    ws.params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    return ws


def _client_folder(folder, n_per_class: int = 6):
    """Two classes of 64 px PNGs (an L and a T shape): bigger than the corpus's 32 px."""
    rng = np.random.default_rng(5)
    for kind in ("L", "T"):
        (folder / kind).mkdir(parents=True)
        for i in range(n_per_class):
            img = np.full((64, 64, 3), 255, np.uint8)
            r, c = rng.integers(4, 20, 2)
            colour = rng.integers(0, 128, 3)
            if kind == "L":
                img[r:r + 36, c:c + 8] = colour
                img[r + 28:r + 36, c:c + 28] = colour
            else:
                img[r:r + 8, c:c + 32] = colour
                img[r:r + 36, c + 12:c + 20] = colour
            Image.fromarray(img).save(folder / kind / f"{i}.png")
    return folder


def test_default_size_keeps_the_expert_keys_and_the_bundle_of_before(tiny_index):
    import torch

    # Keys computed with the code before train_experts.image_size existed, for the same inputs:
    # an index at the default size reuses every expert it had.
    assert stage._expert_key(["a", "b"], ["s1", "s2"], Params()) == "e05491e86c1e84cf2e0554fd"
    assert stage._expert_key(["a", "b"], ["s1", "s2"], Params(), torch.device("cuda")) == "15452a4acfbc70ca7d77c40b"
    tiny = Params.model_validate({"train_experts": TINY_PARAMS["train_experts"]})
    assert stage._expert_key(["x"], ["h"], tiny) == "14bff93766c5f2aec8698929"
    # The reader count is where the decoding runs, not what the expert is; the size is what it is.
    runtime = tiny.model_copy(update={"train_experts": tiny.train_experts.model_copy(update={"loader_workers": 0})})
    assert stage._expert_key(["x"], ["h"], runtime) == "14bff93766c5f2aec8698929"
    at48 = tiny.model_copy(update={"train_experts": tiny.train_experts.model_copy(update={"image_size": SIZE})})
    assert stage._expert_key(["x"], ["h"], at48) != "14bff93766c5f2aec8698929"

    ws, _ = tiny_index
    bundle = load_bundle(ws.stage_dir("experts"))
    assert bundle["input_size"] == 32
    assert not {"image_size", "loader_workers"} & set(bundle["train_params"])  # the bundle's bytes of before
    assert not (ws.artifacts_dir / stage.PIXELS_CACHE).exists()  # the extract stage's pixels served


def test_experts_train_at_48_px_from_the_originals_and_clients_score_at_it(tiny_index, tmp_path, caplog):
    import torch

    from flows.cli import main

    _, summary = tiny_index
    ws = _copy_at(tiny_index, tmp_path, SIZE)
    params = load_params(ws.params_path)
    caplog.set_level(logging.INFO, logger="nds.index.experts")
    bundle = run_stage("train_experts", ws, progress=False)
    assert bundle["input_size"] == SIZE and bundle["train_params"]["image_size"] == SIZE
    assert bundle["index_version"] != summary["index_version"]  # other experts: another index version
    assert not any(e.get("reused") for e in bundle["experts"])
    _, meta = load_expert(ws.stage_dir("experts") / bundle["experts"][0]["file"])
    assert meta["input_size"] == SIZE

    # The pixels cache: one file per cluster, its members' originals decoded at 48 px.
    index, assignments = load_index_order(ws), load_assignments(ws)
    files = sorted((ws.artifacts_dir / stage.PIXELS_CACHE).glob("*.npy"))
    shapes = [np.load(f, mmap_mode="r").shape for f in files]
    assert len(files) == bundle["k"] and {s[1:] for s in shapes} == {(SIZE, SIZE, 3)}
    assert sum(s[0] for s in shapes) == index.num_rows
    clusters = stage._cluster_pixels(ws, params, index, assignments)
    path, members = clusters[0]
    rows = index.take(members[[0, -1]]).to_pylist()
    pixels = np.load(path)
    for got, row in zip(pixels[[0, -1]], rows):
        expected = decode_object(resolve_uri(ws.data_dir, row["uri"]), (SIZE,), sha256=row["sha256"])[0]
        assert np.array_equal(got, expected)
    assert any("decoding" in r.getMessage() and "reader processes" in r.getMessage() for r in caplog.records)

    # The client decodes its (64 px) files again at the bundle's size, and every expert's first
    # convolution sees 48 px inputs.
    folder = _client_folder(tmp_path / "client")
    data = load_client_images(folder, progress=False)
    assert data.images.shape[1:] == (32, 32, 3)
    at48 = client_images_at(data, SIZE)
    for i in (0, len(data) - 1):
        original = decode_image((folder / data.paths[i]).read_bytes())
        assert np.array_equal(at48[i], to_array(original, SIZE))
    scaled = to_array(Image.fromarray(data.images[0]), SIZE)
    assert not np.array_equal(at48[0], scaled)  # not the 32 px pixels scaled up
    # Images held only in memory (no file to read again) are scaled from their 32 px pixels.
    in_memory = ClientData(data.images, data.labels, data.class_names, [""] * len(data))
    assert np.array_equal(client_images_at(in_memory, SIZE)[0], scaled)
    seen: set[tuple[int, int]] = set()

    def first_conv(module, args):
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:
            seen.add(tuple(args[0].shape[-2:]))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(first_conv)
    try:
        for mode in ("rotation", "linear"):
            result = score_experts(ws.stage_dir("experts"), data, mode=mode, progress=False, device="cpu")
            assert result.scores.shape == (bundle["k"],) and np.isfinite(result.scores).all()
    finally:
        hook.remove()
    assert seen == {(SIZE, SIZE)}
    out = tmp_path / "scores.json"
    assert main(["-q", "client", "score", "--experts", str(ws.stage_dir("experts")), "--data", str(folder),
                 "--out", str(out), "--mode", "combined", "--device", "cpu"]) == 0
    scores = json.loads(out.read_text())
    assert scores["bundle_sha256"] == bundle["bundle_sha256"] and len(scores["scores"]) == bundle["k"]
    assert np.isfinite(scores["scores"]).all()

    # A second run reuses every expert and decodes nothing; the bundle is the same bytes.
    before = (ws.stage_dir("experts") / BUNDLE_FILE).read_bytes()
    caplog.clear()
    run_stage("train_experts", ws, progress=False)
    assert (ws.stage_dir("experts") / BUNDLE_FILE).read_bytes() == before
    messages = [r.getMessage() for r in caplog.records]
    assert sum("reused from" in m for m in messages) == bundle["k"] and not any("decoding" in m for m in messages)

    # A cluster whose pixels are gone: only its originals are decoded again, to the same bytes.
    kept = path.read_bytes()
    path.unlink()
    done = stage.prepare_pixels(ws, params)
    assert done["clusters_decoded"] == 1 and done["images_decoded"] == len(members)
    assert path.read_bytes() == kept


def test_a_48_px_bundle_ties_its_size_to_its_checksum(tiny_index, tmp_path):
    """The size is covered by the checksum (a client scoring at another size would get meaningless
    scores); a size this nds cannot score at is one clear error."""
    ws = _copy_at(tiny_index, tmp_path, SIZE)
    run_stage("train_experts", ws, progress=False)
    doc = json.loads((ws.stage_dir("experts") / BUNDLE_FILE).read_text())
    doc["input_size"] = 32  # edited after signing
    (ws.stage_dir("experts") / BUNDLE_FILE).write_text(json.dumps(doc))
    with pytest.raises(InvalidInputError, match="bundle checksum mismatch"):
        load_bundle(ws.stage_dir("experts"))
    doc["input_size"] = 1024  # a bundle from a newer nds, correctly signed
    doc["bundle_sha256"] = bundle_checksum(doc)
    (ws.stage_dir("experts") / BUNDLE_FILE).write_text(json.dumps(doc))
    data = load_client_images(_client_folder(tmp_path / "client"), progress=False)
    with pytest.raises(InvalidInputError, match=r"bundle input size 1024 .*update nds"):
        score_experts(ws.stage_dir("experts"), data, mode="rotation", progress=False)


def test_bad_sizes_and_array_rows_are_clear_errors(tiny_index, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train_experts": {"image_size": 8}}))
    with pytest.raises(NDSError, match="train_experts.image_size"):
        load_params(path)
    # An index whose rows are 32 px corpus arrays (built before packaged datasets were sources)
    # has no originals to decode at another size.
    ws = _copy_at(tiny_index, tmp_path, SIZE)
    index = load_index_order(ws)
    arrays = pa.array([f"data/images/tiny.npy#{i}" for i in range(index.num_rows)], pa.string())
    pq.write_table(index.set_column(index.schema.get_field_index("uri"), "uri", arrays),
                   ws.stage_dir("extract") / "index.parquet")
    with pytest.raises(InvalidInputError, match=r"image_size 48 decodes the originals.*nds corpus build"):
        stage.prepare_pixels(ws, load_params(ws.params_path))
    assert not list((ws.artifacts_dir / stage.PIXELS_CACHE).glob("*.npy"))
