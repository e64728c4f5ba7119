"""Where a manifest row's image comes from, for `nds client download`: its link, its bytes.

A row is an object (a file, ``s3://``, ``http(s)://`` or ``<shard>.tar#<member>``, read by
`nds.corpus.objects` and kept byte for byte; a packaged demo image is a member of a shard in the
server's ``data/packaged/``, a path relative to its workspace), or a row of a corpus built before
packaged datasets were sources, ``data/images/<dataset>.npy#<row>`` (one row of a domain array,
written as PNG). Presigned links
(`nds select --presign`) live in ``urls.csv`` beside the manifest; without them a row is read
at its ``uri`` (the server's corpus for packaged rows, the client's own credentials for S3).
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from nds.config import Workspace
from nds.corpus import objects
from nds.errors import InvalidInputError, NotFoundError
from nds.formats.manifest import URLS_NAME

#: A packaged row: one image of a domain array (``data/images/<dataset>.npy#<row>``, or the
#: array published to S3 by `nds corpus publish`).
_PACKAGED = re.compile(r"^(?P<array>(?:data/|s3://).+\.npy)#(?P<row>\d+)$")
#: A packaged demo image: a shard member in the server's workspace (``data/packaged/...tar#member``).
_WORKSPACE_MEMBER = re.compile(r"^data/.+?\.(?P<ext>tar|tar\.gz|tgz)#(?P<member>.+)$")
#: Extensions kept as they are; anything else is named after the format Pillow reads.
_KEEP_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_FORMAT_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}


class DamagedArrayError(InvalidInputError):
    """A packaged domain array that cannot be read, or lacks the row a manifest names."""


def is_packaged(uri: str) -> bool:
    """Whether `uri` names a row of a packaged domain array (not an object of its own)."""
    return _PACKAGED.match(uri) is not None


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
    from urllib.parse import parse_qs

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


@dataclass(frozen=True)
class Fetched:
    """One row's image: the bytes to write, their extension, and the hash the catalog compares.

    content_sha256: sha256 of the object's bytes (outside objects) or of the decoded 32-px
    uint8 array (packaged rows, `nds.corpus.read.image_sha256`).
    """

    data: bytes
    extension: str | None  # None: not known from the uri; name it after the decoded format
    content_sha256: str
    packaged: bool


class RowReader:
    """Reads rows' images; thread-safe. Each packaged array behind a URL is fetched once.

    ws: the workspace whose corpus holds packaged rows that have no URL (None: there is none).
    """

    def __init__(self, ws: Workspace | None, *, timeout_s: float, retries: int, backoff_s: float):
        self.ws = ws
        self.options = {"timeout_s": timeout_s, "retries": retries, "backoff_s": backoff_s}
        self._arrays: dict[str, np.ndarray] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def check_local_corpus(self, uris: list[str]) -> None:
        """Open each packaged array that rows read from this machine's corpus, before any download.

        A client without the server's corpus (and without presigned URLs) gets one error here
        instead of a folder of dead links; an S3-published corpus is cached once here.
        """
        from nds.corpus.read import load_images_at

        first = {}
        for uri in uris:
            m = _PACKAGED.match(uri)
            if m and m["array"] not in first:
                first[m["array"]] = uri
            m = _WORKSPACE_MEMBER.match(uri)
            if m and uri.partition("#")[0] not in first:
                first[uri.partition("#")[0]] = uri
        if first and self.ws is None:
            raise InvalidInputError("the manifest names packaged corpus rows but there is no corpus here: "
                                    "run on the server, or select with --presign")
        for uri in first.values():
            try:
                load_images_at(self.ws.data_dir, [uri])
            except NotFoundError as exc:
                raise NotFoundError(f"{exc} (the manifest's rows live in the server's corpus: download on the "
                                    "server, or ask for a selection with --presign)") from None

    def read(self, uri: str, url: str | None) -> Fetched:
        """The image of the row at `uri` (through `url` when given).

        Raises the `nds.corpus.objects` errors (DEAD_LINK_ERRORS for a dead link),
        DamagedArrayError for a packaged array that is damaged or too short.
        """
        packaged = _PACKAGED.match(uri)
        if packaged:
            image = self._packaged_image(packaged, url)
            from nds.corpus.read import image_sha256

            return Fetched(_png(image), ".png", image_sha256(image), packaged=True)
        member = _WORKSPACE_MEMBER.match(uri)
        if member and url and objects.split_member(url) is None:
            # A DVC remote names the shard by its hash (no .tar in the URL): read the member from it.
            from nds.corpus.shards import member_bytes

            data = member_bytes(url.partition("#")[0], member["member"], plain_tar=member["ext"] == "tar",
                                **self.options)
        elif member and not url:
            from nds.corpus.read import resolve_uri

            data = objects.fetch_bytes(resolve_uri(self.ws.data_dir, uri), **self.options)
        else:
            data = objects.fetch_bytes(url or uri, **self.options)
        return Fetched(data, _extension(uri), hashlib.sha256(data).hexdigest(), packaged=False)

    def _packaged_image(self, match: re.Match, url: str | None) -> np.ndarray:
        row = int(match["row"])
        if url is None:
            from nds.corpus.read import load_images_at

            return load_images_at(self.ws.data_dir, [match.group(0)])[0]
        base, sep, url_row = url.rpartition("#")
        if not sep or url_row != match["row"]:
            raise InvalidInputError(f"the presigned link of {match.group(0)} does not end in #{row}: select again")
        array = self._remote_array(base)
        if row >= len(array):
            raise DamagedArrayError(f"row {row} out of range for {match['array']} ({len(array)} images)")
        return np.asarray(array[row])

    def _remote_array(self, url: str) -> np.ndarray:
        with self._lock:
            lock = self._locks.setdefault(url, threading.Lock())
        with lock:  # one fetch per domain array, however many threads want its rows
            if url not in self._arrays:
                raw = objects.fetch_bytes(url, **self.options)
                try:
                    self._arrays[url] = np.load(io.BytesIO(raw), allow_pickle=False)
                except ValueError as exc:
                    raise DamagedArrayError(f"a corpus object is not a .npy image array ({exc})") from None
            return self._arrays[url]


def image_format_extension(data: bytes) -> str:
    """The extension of the image format of `data` (read from its header), ".img" if unknown."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _FORMAT_EXTENSIONS.get(im.format or "", f".{(im.format or 'img').lower()}")
    except Exception:  # noqa: BLE001 - only a name is at stake; decoding was checked before
        return ".img"


def _extension(uri: str) -> str | None:
    """The image extension in `uri` (a tar member's name, a URL's path), if it has one."""
    name = uri.rpartition("#")[2] if re.search(r"\.(tar|tar\.gz|tgz)#", uri) else uri
    path = urlsplit(name).path if "://" in name else name
    suffix = Path(path).suffix.lower()
    return suffix if suffix in _KEEP_EXTENSIONS else None


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
