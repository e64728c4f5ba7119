"""Per-image links for a manifest (`nds select --presign SECONDS`): one URL per selected row.

A manifest row's ``uri`` names the original object (see `nds.corpus.objects`); the client gets:

- ``s3://bucket/key``: a presigned GET URL for that object alone;
- ``s3://bucket/shard.tar#member`` (a WebDataset member): the presigned shard URL + ``#member``;
- ``http(s)://...``: the link itself (already public, or signed by its owner);
- a packaged demo image ``data/packaged/<dataset>/<shard>.tar#<member>``: the presigned URL of the
  shard in the workspace's DVC remote (which must be on S3 and hold the corpus: `dvc push`) +
  ``#<member>``; after `nds corpus publish` the catalog names the ``s3://`` shard itself;
- a row of a corpus built before packaged datasets were sources, ``data/images/<dataset>.npy#<row>``
  (or its published ``s3://.../<dataset>.npy#<row>``): the same, with the domain array + ``#<row>``.

Objects on the server's own disk have no link a client could follow: they are refused with one
error before anything is written. The URLs carry signatures and expire, so they live beside the
manifest in ``urls.csv``, never in it (the manifest's checksum stays the same for the same inputs).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from datetime import datetime, timezone

import pyarrow as pa

from nds.config import Workspace
from nds.errors import InvalidInputError
from nds.formats import manifest

log = logging.getLogger(__name__)

_PACKAGED = re.compile(r"^(?P<array>(?:data/|s3://).+\.npy)#(?P<row>\d+)$")
_TAR_MEMBER = re.compile(r"^(?P<shard>s3://.+?\.(?:tar|tar\.gz|tgz))#(?P<member>.+)$")
#: A packaged demo image: a member of a shard in the workspace's ``data/`` (versioned by DVC).
_WORKSPACE_MEMBER = re.compile(r"^(?P<shard>data/.+?\.(?:tar|tar\.gz|tgz))#(?P<member>.+)$")


def presign_links(ws: Workspace, table: pa.Table, expires_s: int) -> list[str]:
    """One URL per row of `table` (a manifest, rank order), valid `expires_s` seconds.

    Each S3 object (or shard) is signed once, however many rows name it. Signing is local
    (no request per object): a link to an object deleted since registration fails only at
    download, where `nds client download` counts it as dead.
    """
    return _presign(ws, table.column("uri").to_pylist(), expires_s)[0]


def presigned_sidecar(ws: Workspace, table: pa.Table, expires_s: int) -> dict:
    """``{"table": sample_id/rank/url, "info": ...}``: what `nds select --presign` writes as urls.csv
    and records in the summary (``presigned_urls``)."""
    t0 = time.perf_counter()
    urls, counts = _presign(ws, table.column("uri").to_pylist(), expires_s)
    expires_at = datetime.fromtimestamp(datetime.now(timezone.utc).timestamp() + expires_s, timezone.utc)
    out = pa.table({"sample_id": table.column("sample_id"), "rank": table.column("rank"),
                    "url": pa.array(urls, pa.string())})
    info = {"file": manifest.URLS_NAME, "expires_s": int(expires_s),
            "expires_at": expires_at.isoformat(timespec="seconds"), **counts}
    log.info("presigned %d links (%d S3 objects signed, %d http links passed through) in %.2f s",
             len(urls), counts["objects"], counts["passed_through"], time.perf_counter() - t0)
    return {"table": out, "info": info}


def _presign(ws: Workspace, uris: list[str], expires_s: int) -> tuple[list[str], dict]:
    from nds.platform import storage

    if not 1 <= int(expires_s) <= storage.MAX_PRESIGN_S:
        raise InvalidInputError(f"presign expiry {expires_s}s must lie in [1, {storage.MAX_PRESIGN_S}] "
                                "(S3 allows 7 days at most)")
    # DVC resolves each packaged domain array once (it opens the repository on every call).
    remote = functools.lru_cache(maxsize=None)(lambda path: storage.dvc_object_uri(ws.root, path))
    # Resolve every row first: a local object is refused before a single URL is signed.
    plans = [_plan(uri, remote) for uri in uris]
    client = storage.s3_client() if any(obj for obj, _, _ in plans) else None
    signed: dict[str, str] = {}
    out = []
    for obj, suffix, must_exist in plans:
        if obj is None:
            out.append(suffix)
            continue
        if obj not in signed:
            signed[obj] = storage.presign_s3_uri(obj, expires_s, client=client, must_exist=must_exist)
        out.append(signed[obj] + suffix)
    return out, {"objects": len(signed), "passed_through": sum(1 for obj, _, _ in plans if obj is None)}


def _plan(uri: str, remote) -> tuple[str | None, str, bool]:
    """(S3 object to sign or None, what follows its URL (or the link itself), check it exists).

    remote: workspace path of a packaged array -> where its DVC remote keeps it.
    """
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        return None, uri, False
    packaged = _PACKAGED.match(uri) or _WORKSPACE_MEMBER.match(uri)
    if packaged and "shard" in packaged.groupdict():
        return _dvc_object(remote, packaged["shard"]), f"#{packaged['member']}", True
    if packaged:
        array = packaged["array"]
        # A packaged array is one object per domain: check it once so a missing push is one
        # clear error here, not thousands of dead links at the client.
        obj = array if array.startswith("s3://") else _dvc_object(remote, array)
        return obj, f"#{packaged['row']}", True
    member = _TAR_MEMBER.match(uri)
    if member:
        return member["shard"], f"#{member['member']}", False
    if scheme == "s3":
        return uri, "", False
    raise InvalidInputError(
        f"selected object {uri} is on this server's disk ({scheme or 'a path'}): presigned links need objects "
        "in S3 or on HTTP; register the source from S3, or download without --presign on this machine")


def _dvc_object(remote, path: str) -> str:
    """The S3 object that holds workspace file `path` in the DVC remote; an error if it is not on S3."""
    obj = remote(path)
    if not obj.startswith("s3://"):
        raise InvalidInputError(
            f"the corpus is stored locally (DVC remote object {obj}): presigned URLs need the corpus on an "
            "S3 DVC remote (`dvc remote add -d NAME s3://bucket/prefix` + `dvc push`) or published "
            "(`nds corpus publish s3://bucket/prefix`); without --presign the client downloads from this server's copy")
    return obj
