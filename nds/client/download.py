"""Materialise a manifest's images as an ImageFolder tree (`<dataset>/<label>/<sample>.png`)."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from nds._io import atomic_dir
from nds.config import Workspace
from nds.corpus.read import load_images, split_uri
from nds.errors import InvalidInputError, StorageError
from nds.formats.manifest import URLS_NAME, load_manifest

log = logging.getLogger(__name__)

#: A presigned download reads each corpus object once; a stalled server fails, not hangs.
URL_TIMEOUT_S = 120

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A file-name-safe form of a label or sample id (no separators, no '..')."""
    name = _UNSAFE.sub("_", text).strip("._") or "_"
    return name


def load_url_column(manifest_path: Path, table) -> list[str] | None:
    """The presigned `url` of each manifest row (urls.csv beside the manifest), or None."""
    import pyarrow.csv as pacsv

    path = Path(manifest_path)
    urls_file = (path if path.is_dir() else path.parent) / URLS_NAME
    if not urls_file.exists():
        return None
    urls = pacsv.read_csv(urls_file, convert_options=pacsv.ConvertOptions(
        column_types={"sample_id": "string", "url": "string"}))
    by_id = dict(zip(urls.column("sample_id").to_pylist(), urls.column("url").to_pylist()))
    missing = [s for s in table.column("sample_id").to_pylist() if s not in by_id]
    if missing:
        raise InvalidInputError(f"{urls_file} has no url for {len(missing)} manifest rows (e.g. {missing[0]}): select again")
    urls = [by_id[s] for s in table.column("sample_id").to_pylist()]
    check_not_expired(urls, urls_file)
    return urls


def presigned_expiry(url: str) -> datetime | None:
    """When a presigned S3 URL stops working (SigV4 X-Amz-Date + X-Amz-Expires, or SigV2 Expires)."""
    from urllib.parse import parse_qs, urlsplit

    query = {k.lower(): v[0] for k, v in parse_qs(urlsplit(url.partition("#")[0]).query).items()}
    try:
        if "x-amz-date" in query and "x-amz-expires" in query:
            signed = datetime.strptime(query["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
            return signed + timedelta(seconds=int(query["x-amz-expires"]))
        if "expires" in query:
            return datetime.fromtimestamp(int(query["expires"]), timezone.utc)
    except ValueError as exc:
        raise InvalidInputError(f"a presigned URL has an unreadable expiry ({exc}): select again with --presign") from exc
    return None


def check_not_expired(urls: list[str], where: Path, *, now: datetime | None = None) -> None:
    """Refuse expired presigned URLs before fetching anything.

    Not every S3-compatible server enforces the expiry (moto does not), and a server that
    does answers a bare 403; checking here gives one clear error and leaves no partial download.
    """
    now = now or datetime.now(timezone.utc)
    ends = [e for e in (presigned_expiry(u) for u in dict.fromkeys(u.partition("#")[0] for u in urls)) if e]
    expired = [e for e in ends if e <= now]
    if expired:
        raise InvalidInputError(
            f"the presigned URLs in {where} expired at {min(expired).isoformat(timespec='seconds')} "
            f"({len(expired)} of {len(ends)} objects): ask for a new selection with `nds select --presign SECONDS`"
        )


class _UrlImages:
    """Images behind presigned URLs `<object url>#<row>`; each object is fetched once."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self._arrays: dict[str, np.ndarray] = {}

    def _array(self, base: str) -> np.ndarray:
        import io
        import urllib.error
        import urllib.request

        if base not in self._arrays:
            try:
                with urllib.request.urlopen(base, timeout=URL_TIMEOUT_S) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                hint = "the URLs have expired: select again with --presign" if exc.code in (400, 403) else "check the URL"
                raise StorageError(f"download of a corpus object failed with HTTP {exc.code}: {hint}") from exc
            except (urllib.error.URLError, OSError) as exc:
                raise StorageError(f"cannot reach the corpus store ({exc}): check the network") from exc
            try:
                self._arrays[base] = np.load(io.BytesIO(raw), allow_pickle=False)
            except ValueError as exc:
                raise InvalidInputError(f"a corpus object is not a .npy image array ({exc})") from exc
        return self._arrays[base]

    def load(self, start: int, stop: int) -> list[np.ndarray]:
        out = []
        for url in self.urls[start:stop]:
            base, sep, row = url.rpartition("#")
            if not sep or not row.isdigit():
                raise InvalidInputError(f"url {url[:80]}... lacks its #row suffix")
            arr = self._array(base)
            if int(row) >= len(arr):
                raise InvalidInputError(f"row {row} out of range for a corpus object of {len(arr)} images")
            out.append(arr[int(row)])
        return out


@contextmanager
def image_folder_writer(out_dir: Path) -> Iterator[Callable[[np.ndarray, tuple[str, ...], str], None]]:
    """Yield `write(image, folders, name)` saving PNGs under a temporary sibling of `out_dir`,
    which becomes `out_dir` in one rename when the block succeeds (and is removed otherwise)."""
    from PIL import Image

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidInputError(f"{out_dir} is not empty: choose a new folder")
    with atomic_dir(out_dir) as staging:

        def write(image: np.ndarray, folders: tuple[str, ...], name: str) -> None:
            folder = staging.joinpath(*(safe_name(f) for f in folders))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{safe_name(name)}.png")

        yield write


def download_manifest(manifest_path: Path, out_dir: Path, *, ws: Workspace, progress: bool = True) -> dict:
    """Write every selected image as a PNG under `out_dir`; atomic (temp folder, then rename).

    Images come from presigned URLs when the manifest has them (`urls.csv`, from
    `nds select --presign`), otherwise from the workspace's corpus (`ws.data_dir`).
    """
    from tqdm import tqdm

    table = load_manifest(Path(manifest_path))
    urls = load_url_column(Path(manifest_path), table)
    remote = _UrlImages(urls) if urls is not None else None
    parsed = [split_uri(u) for u in table.column("uri").to_pylist()]
    arrays = [a for a, _ in parsed]
    rows = np.asarray([r for _, r in parsed], dtype=np.int64)
    datasets = table.column("dataset").to_pylist()
    labels = table.column("label").to_pylist()
    ids = table.column("sample_id").to_pylist()
    chunk = 2048
    with image_folder_writer(out_dir) as write, tqdm(
        total=len(ids), desc="download", unit="img", disable=not progress
    ) as bar:
        for s in range(0, len(ids), chunk):
            if remote is not None:
                images = remote.load(s, s + chunk)
            else:
                images = load_images(ws.data_dir, arrays[s : s + chunk], rows[s : s + chunk])
            for i, img in enumerate(images, start=s):
                write(img, (datasets[i], labels[i]), ids[i])
            bar.update(len(images))
    log.info("downloaded %d images to %s", len(ids), out_dir)
    return {"images": len(ids), "out_dir": str(out_dir), "datasets": sorted(set(datasets)),
            "source": "presigned URLs" if remote is not None else str(ws.data_dir)}
