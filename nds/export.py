"""Materialise a manifest's images as an ImageFolder tree (`<dataset>/<label>/<sample>.png`)."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from nds.config import Workspace
from nds.corpus import load_images
from nds.errors import NDSError
from nds.manifest import load_manifest

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A file-name-safe form of a label or sample id (no separators, no '..')."""
    name = _UNSAFE.sub("_", text).strip("._") or "_"
    return name


def parse_uri(uri: str) -> tuple[str, int]:
    """`data/images/mnist.npy#12` -> ("images/mnist.npy", 12), relative to the corpus folder."""
    path, sep, row = uri.rpartition("#")
    if not sep or not row.isdigit() or not path.startswith("data/"):
        raise NDSError(f"unsupported sample uri {uri!r}: expected data/images/<dataset>.npy#<row>")
    return path.removeprefix("data/"), int(row)


def download_manifest(manifest_path: Path, out_dir: Path, *, ws: Workspace, progress: bool = True) -> dict:
    """Write every selected image as a PNG under `out_dir`; atomic (temp folder, then rename)."""
    from PIL import Image
    from tqdm import tqdm

    table = load_manifest(Path(manifest_path))
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise NDSError(f"{out_dir} is not empty: choose a new folder for the download")
    parsed = [parse_uri(u) for u in table.column("uri").to_pylist()]
    arrays = [a for a, _ in parsed]
    rows = np.asarray([r for _, r in parsed], dtype=np.int64)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        datasets = table.column("dataset").to_pylist()
        labels = table.column("label").to_pylist()
        ids = table.column("sample_id").to_pylist()
        chunk = 2048
        with tqdm(total=len(ids), desc="download", unit="img", disable=not progress) as bar:
            for s in range(0, len(ids), chunk):
                images = load_images(ws.data_dir, arrays[s : s + chunk], rows[s : s + chunk])
                for i, img in enumerate(images, start=s):
                    folder = staging / safe_name(datasets[i]) / safe_name(labels[i])
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(img).save(folder / f"{safe_name(ids[i])}.png")
                bar.update(len(images))
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("downloaded %d images to %s", len(ids), out_dir)
    return {"images": len(ids), "out_dir": str(out_dir), "datasets": sorted(set(datasets))}
