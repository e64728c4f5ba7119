"""Members of tar shards (WebDataset): ``<shard uri>#<member name>``, read by `nds.corpus.objects`.

A local shard is read in place. A remote one (``s3://``, ``http(s)://``) is downloaded once per
process into a temporary folder (removed at exit; `clear_shard_cache` forgets it sooner), however
many threads want its members. An uncompressed ``.tar`` is indexed once (member -> offset) and
each member is one seek; ``.tar.gz``/``.tgz`` have no random access and are scanned by streaming.
Errors are those of `nds.corpus.objects` (a missing member is an `ObjectNotFoundError`).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from nds.corpus import objects
from nds.corpus.objects import ObjectAccessError, ObjectNotFoundError, ObjectTooLargeError, shown_uri

log = logging.getLogger(__name__)

_SHARDS: dict[str, Path] = {}
_LOCK = threading.Lock()
_SHARD_LOCKS: dict[str, threading.Lock] = {}


def member_bytes(shard: str, member: str, *, timeout_s: float, retries: int, backoff_s: float,
                 plain_tar: bool | None = None) -> bytes:
    """The bytes of `member` in the tar at `shard` (any uri form of `nds.corpus.objects`).

    plain_tar: whether the shard is an uncompressed tar (None: from the name ending in ``.tar``;
    a content-addressed URL, e.g. a DVC remote object, has no such name).
    """
    uri = f"{shard}#{member}"
    path = _local_shard(shard, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
    if plain_tar is None:
        plain_tar = (urlsplit(shard).path if "://" in shard else shard).endswith(".tar")
    try:
        stat = path.stat()
        if not plain_tar:  # compressed
            return _scan_member(path, member, uri)
        try:
            index = _tar_index(str(path), stat.st_mtime_ns, stat.st_size)
        except tarfile.TarError as exc:
            raise ObjectNotFoundError(f"{shown_uri(shard)} is not a readable tar ({exc}): its members are lost") from None
        where = index.get(_member_key(member))
        if where is None:
            raise ObjectNotFoundError(f"{shown_uri(uri)} not found: the shard has no member {member!r}")
        offset, size = where
        if size > objects.MAX_OBJECT_BYTES:
            raise ObjectTooLargeError(f"{shown_uri(uri)} has {size} bytes, over the {objects.MAX_OBJECT_BYTES}-byte limit")
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise ObjectNotFoundError(f"{shown_uri(uri)} is cut short ({len(data)} of {size} bytes): the shard is truncated")
        return data
    except FileNotFoundError:
        raise ObjectNotFoundError(f"{shown_uri(shard)} not found: check the shard path") from None
    except PermissionError as exc:
        raise ObjectAccessError(f"cannot read {shown_uri(shard)} ({exc.strerror}): check its permissions") from None


def clear_shard_cache() -> None:
    """Forget (and delete) the remote shards this process downloaded."""
    with _LOCK:
        for path in _SHARDS.values():
            path.unlink(missing_ok=True)
        _SHARDS.clear()
    _tar_index.cache_clear()


@functools.lru_cache(maxsize=1)
def _shard_dir(pid: int) -> Path:
    path = Path(tempfile.mkdtemp(prefix="nds-shards-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def _local_shard(shard: str, *, timeout_s: float, retries: int, backoff_s: float) -> Path:
    """A local path holding `shard`: the file itself, or this process's downloaded copy."""
    if objects.uri_kind(shard) == "file":
        return objects.local_path(shard)
    with _LOCK:
        lock = _SHARD_LOCKS.setdefault(shard, threading.Lock())
    with lock:  # one download per shard, however many threads want its members
        if shard in _SHARDS and _SHARDS[shard].exists():
            return _SHARDS[shard]
        dest = _shard_dir(os.getpid()) / f"{len(_SHARDS):06d}-{Path(urlsplit(shard).path).name}"
        t0 = time.perf_counter()
        size = objects.download_to(shard, dest, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
        log.info("fetched shard %s (%d bytes, %.1f s)", shown_uri(shard), size, time.perf_counter() - t0)
        with _LOCK:
            _SHARDS[shard] = dest
        return dest


@functools.lru_cache(maxsize=64)
def _tar_index(path: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size) of an uncompressed tar (keyed by mtime and size: a
    rewritten shard is indexed again)."""
    index: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if info.isfile():
                index[_member_key(info.name)] = (info.offset_data, info.size)
    return index


def _member_key(name: str) -> str:
    return name.removeprefix("./")


def _scan_member(path: Path, member: str, uri: str) -> bytes:
    """A member of a compressed shard, found by streaming through it (no random access)."""
    want = _member_key(member)
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                if info.isfile() and _member_key(info.name) == want:
                    if info.size > objects.MAX_OBJECT_BYTES:
                        raise ObjectTooLargeError(f"{shown_uri(uri)} is over the {objects.MAX_OBJECT_BYTES}-byte limit")
                    return tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ObjectNotFoundError(f"{shown_uri(uri)} cannot be read from its shard ({exc})") from None
    raise ObjectNotFoundError(f"{shown_uri(uri)} not found: the shard has no member {member!r}")
