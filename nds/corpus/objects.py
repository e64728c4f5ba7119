"""Read one image object by its catalog ``uri``, wherever it lives; tell its version.

A ``uri`` names the original object of a catalog row (never a copy):

- a local path (``/data/cats/1.jpg``, or relative to the working directory) or ``file:///...``;
- ``s3://bucket/key``, read through the one S3 client (`nds.platform.storage.s3_client`);
- ``http://...`` / ``https://...`` (a presigned S3 URL is one of these);
- a member of a tar shard (WebDataset): ``<shard uri>#<member name>``, where the shard is any of
  the above and its name ends in ``.tar``, ``.tar.gz`` or ``.tgz`` (read by `nds.corpus.shards`:
  a remote shard is fetched once per process).

A ``#`` splits a member name off only after a tar suffix, so a file called ``#1.jpg`` stays a file.

Failures are `NDSError` subclasses whose one-line message names the uri (without its query
string: a presigned URL's signature never reaches a log or a report):

- `ObjectNotFoundError` (a `NotFoundError`): HTTP 404/410, no such key, file or member;
- `ObjectAccessError` (a `StorageError`): HTTP 401/403 or another refusal; not retried;
- `ObjectUnreachableError` (a `StorageError`): 5xx, 429, timeouts, refused or reset connections,
  still failing after the retries (exponential backoff: ``backoff_s * 2**attempt``);
- `ObjectTooLargeError` (an `InvalidInputError`): more than `MAX_OBJECT_BYTES`.

`DEAD_LINK_ERRORS` groups the first three: what a downloader counts as a dead link.
S3 objects are retried by the S3 client itself (`storage.S3_MAX_ATTEMPTS`, standard mode), not
again here. No torch; thread-safe (one HTTP and one S3 client per process, made on first use).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from nds.errors import InvalidInputError, NotFoundError, StorageError

log = logging.getLogger(__name__)

#: Defaults: a link that has not answered in 30 s is treated as slow, three retries span
#: 0.5 + 1 + 2 s of backoff, which rides out a restarting server without stalling a download.
TIMEOUT_S = 30.0
RETRIES = 3
BACKOFF_S = 0.5
#: No image NDS indexes comes near this; a larger object is refused rather than held in memory.
MAX_OBJECT_BYTES = 256 << 20
#: HTTP answers worth another try (request timeout, too early, rate limited, server errors).
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_TAR_MEMBER = re.compile(r"^(?P<shard>.+?\.(?:tar|tar\.gz|tgz))#(?P<member>.+)$")
_TAR_SUFFIX = re.compile(r"\.(?:tar|tar\.gz|tgz)$")
_CHUNK = 1 << 20


class ObjectNotFoundError(NotFoundError):
    """The object does not exist (HTTP 404/410, no such S3 key, file or tar member)."""


class ObjectAccessError(StorageError):
    """The store refused the object (HTTP 401/403: no permission or an expired link)."""


class ObjectUnreachableError(StorageError):
    """The store did not answer, or kept failing, through every retry."""


class ObjectTooLargeError(InvalidInputError):
    """The object is larger than `MAX_OBJECT_BYTES`."""


DEAD_LINK_ERRORS = (ObjectNotFoundError, ObjectAccessError, ObjectUnreachableError)


class _Transient(Exception):
    """One failed attempt that is worth retrying (internal)."""


def fetch_bytes(uri: str, *, timeout_s: float = TIMEOUT_S, retries: int = RETRIES,
                backoff_s: float = BACKOFF_S) -> bytes:
    """The bytes of the object at `uri` (see the module docstring for the forms).

    timeout_s: per attempt, for connecting and for each read (network objects only).
    retries: further attempts after the first on transient failures; backoff_s * 2**i between them.
    Raises ObjectNotFoundError, ObjectAccessError, ObjectUnreachableError, ObjectTooLargeError,
    or InvalidInputError for a uri of no supported form.
    """
    _check_retry_args(timeout_s, retries, backoff_s)
    tar = split_member(uri)
    if tar:
        from nds.corpus import shards

        return shards.member_bytes(*tar, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
    where = uri_kind(uri)
    if where == "file":
        return _file_bytes(local_path(uri), uri)
    if where == "s3":
        return _s3_bytes(uri)
    return _retrying(uri, lambda: _http_get(uri, timeout_s), retries=retries, backoff_s=backoff_s)


def object_version(uri: str, *, timeout_s: float = TIMEOUT_S, retries: int = RETRIES,
                   backoff_s: float = BACKOFF_S) -> str:
    """What identifies the current version of the object at `uri`.

    The ETag for S3 and HTTP (HEAD; quotes removed), ``"<size>-<mtime_ns>"`` for a file. An HTTP
    server without ETag gives ``"<Content-Length>-<Last-Modified>"``, or "" when it sends neither.
    A tar member has its shard's version (a member changes only with its shard).
    Raises the same errors as `fetch_bytes`.
    """
    _check_retry_args(timeout_s, retries, backoff_s)
    tar = split_member(uri)
    if tar:
        uri = tar[0]
    where = uri_kind(uri)
    if where == "file":
        path = local_path(uri)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{shown_uri(uri)} not found: check the path") from None
        except OSError as exc:
            raise ObjectAccessError(f"cannot read {shown_uri(uri)} ({exc.strerror}): check its permissions") from exc
        return f"{stat.st_size}-{stat.st_mtime_ns}"
    if where == "s3":
        bucket, key = _s3_parts(uri)
        head = _s3_call(uri, lambda c: c.head_object(Bucket=bucket, Key=key))
        return str(head.get("ETag", "")).strip('"')
    return _retrying(uri, lambda: _http_version(uri, timeout_s), retries=retries, backoff_s=backoff_s)


# --------------------------------------------------------------------------- forms and messages


def uri_kind(uri: str) -> str:
    """How the object at `uri` (not a tar member) is read: "file", "s3" or "http"."""
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if scheme in ("", "file"):
        return "file"
    if scheme in ("s3", "http", "https"):
        return scheme if scheme == "s3" else "http"
    raise InvalidInputError(f"unsupported object uri {shown_uri(uri)}: use a path, file://, s3://, http(s):// "
                            "or <shard>.tar#<member>")


def split_member(uri: str) -> tuple[str, str] | None:
    """(shard, member) of a tar member uri, else None. A URL's query (a presigned shard link)
    comes before the ``#member``: the tar suffix is looked for in its path."""
    plain = _TAR_MEMBER.match(uri)
    if plain:
        return plain["shard"], plain["member"]
    base, sep, member = uri.partition("#")
    if sep and member and "://" in base and _TAR_SUFFIX.search(urlsplit(base).path):
        return base, member
    return None


def shown_uri(uri: str) -> str:
    """`uri` without query string or credentials, safe to log (presigned URLs carry signatures)."""
    if "://" not in uri or uri.startswith("s3://"):  # an S3 uri carries no credentials
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    member = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{host}{parts.path}{member}"


def _check_retry_args(timeout_s: float, retries: int, backoff_s: float) -> None:
    if not timeout_s > 0 or retries < 0 or backoff_s < 0:
        raise InvalidInputError(f"timeout_s must be > 0, retries and backoff_s >= 0 "
                                f"(got {timeout_s}, {retries}, {backoff_s})")


def _retrying(uri: str, attempt, *, retries: int, backoff_s: float):
    for i in range(retries + 1):
        try:
            return attempt()
        except _Transient as exc:
            if i == retries:
                raise ObjectUnreachableError(
                    f"{shown_uri(uri)} failed {retries + 1} time(s), last: {exc}: check the link and the network"
                ) from None
            log.debug("retrying %s in %.2f s (%s)", shown_uri(uri), backoff_s * 2**i, exc)
            time.sleep(backoff_s * 2**i)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- files


def local_path(uri: str) -> Path:
    if uri.lower().startswith("file:"):
        from urllib.request import url2pathname

        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise InvalidInputError(f"{uri}: a file URL names a local path, e.g. file:///data/img.jpg")
        return Path(url2pathname(parts.path))
    return Path(uri)


def _file_bytes(path: Path, uri: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_OBJECT_BYTES:
            raise ObjectTooLargeError(f"{shown_uri(uri)} has {size} bytes, over the {MAX_OBJECT_BYTES}-byte limit")
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ObjectNotFoundError(f"{shown_uri(uri)} not found: check the path") from None
    except IsADirectoryError:
        raise ObjectNotFoundError(f"{shown_uri(uri)} is a folder, not an image file") from None
    except PermissionError as exc:
        raise ObjectAccessError(f"cannot read {shown_uri(uri)} ({exc.strerror}): check its permissions") from None


# --------------------------------------------------------------------------- S3


@functools.lru_cache(maxsize=8)
def _s3_client_for(pid: int, endpoint: str | None):
    from nds.platform.storage import s3_client

    return s3_client()


def _s3_client():
    # Keyed by process (a forked worker must not share its parent's connections) and by the
    # configured endpoint (tests and tools point NDS at another S3 server at run time).
    from nds.platform.storage import S3_ENDPOINT_ENV

    return _s3_client_for(os.getpid(), os.environ.get(S3_ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL"))


def _s3_parts(uri: str) -> tuple[str, str]:
    # Split by hand: an S3 key is raw text, where '%', '?' and '#' are ordinary characters.
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise InvalidInputError(f"{uri} is not an S3 object: use s3://bucket/key")
    return bucket, key


def _s3_call(uri: str, call):
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_client()
    try:
        return call(client)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket") or status == 404:
            raise ObjectNotFoundError(f"{uri} not found ({code or status})") from None
        if code in ("403", "AccessDenied", "Forbidden") or status in (401, 403):
            raise ObjectAccessError(f"S3 refused {uri} ({code or status}): check the credentials") from None
        raise ObjectUnreachableError(f"S3 failed on {uri} ({code or status}): retry later") from None
    except BotoCoreError as exc:
        raise ObjectUnreachableError(
            f"cannot reach S3 at {client.meta.endpoint_url} for {uri} ({exc}): check NDS_S3_ENDPOINT_URL "
            "and the network") from None


def _s3_bytes(uri: str) -> bytes:
    bucket, key = _s3_parts(uri)

    def read(client):
        body = client.get_object(Bucket=bucket, Key=key)
        if int(body.get("ContentLength") or 0) > MAX_OBJECT_BYTES:
            body["Body"].close()
            raise ObjectTooLargeError(f"{uri} has {body['ContentLength']} bytes, over the "
                                      f"{MAX_OBJECT_BYTES}-byte limit")
        return body["Body"].read()

    return _s3_call(uri, read)


# --------------------------------------------------------------------------- HTTP


@functools.lru_cache(maxsize=4)
def _http_client_for(pid: int):
    import httpx

    # Connection pooling across the downloader's threads; redirects are followed because
    # link tables often hold short or CDN links.
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    return httpx.Client(follow_redirects=True, limits=limits, timeout=TIMEOUT_S)


def _http_status(uri: str, code: int) -> None:
    if 200 <= code < 300:
        return
    if code in (404, 410):
        raise ObjectNotFoundError(f"{shown_uri(uri)} answered HTTP {code}: the object is gone")
    if code in (401, 403):
        raise ObjectAccessError(f"{shown_uri(uri)} answered HTTP {code}: no access (or the link expired)")
    if code in _RETRY_STATUS or code >= 500:
        raise _Transient(f"HTTP {code}")
    raise ObjectAccessError(f"{shown_uri(uri)} answered HTTP {code}: the server refused the request")


def _http_request(uri: str, method: str, timeout_s: float, consume):
    import httpx

    try:
        with _http_client_for(os.getpid()).stream(method, uri.partition("#")[0], timeout=timeout_s) as resp:
            _http_status(uri, resp.status_code)
            return consume(resp)
    except httpx.TimeoutException:
        raise _Transient(f"no answer within {timeout_s:g} s") from None
    except httpx.TransportError as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from None
    except httpx.InvalidURL as exc:
        raise InvalidInputError(f"{shown_uri(uri)} is not a valid URL ({exc})") from None


def _read_limited(uri: str, resp, sink=None) -> bytes | int:
    """The body of `resp`, refused past MAX_OBJECT_BYTES; into `sink` (a file) when given."""
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_OBJECT_BYTES and sink is None:
        raise ObjectTooLargeError(f"{shown_uri(uri)} has {declared} bytes, over the {MAX_OBJECT_BYTES}-byte limit")
    buf, n = bytearray(), 0
    for chunk in resp.iter_bytes(_CHUNK):
        n += len(chunk)
        if sink is not None:
            sink.write(chunk)
            continue
        if n > MAX_OBJECT_BYTES:
            raise ObjectTooLargeError(f"{shown_uri(uri)} is over the {MAX_OBJECT_BYTES}-byte limit")
        buf += chunk
    return n if sink is not None else bytes(buf)


def _http_get(uri: str, timeout_s: float) -> bytes:
    return _http_request(uri, "GET", timeout_s, lambda resp: _read_limited(uri, resp))


def _http_version(uri: str, timeout_s: float) -> str:
    def read(resp) -> str:
        h = resp.headers
        if h.get("etag"):
            return h["etag"].removeprefix("W/").strip('"')
        parts = [p for p in (h.get("content-length"), h.get("last-modified")) if p]
        return "-".join(parts)

    try:
        return _http_request(uri, "HEAD", timeout_s, read)
    except ObjectAccessError:
        # Some servers (and presigned GET URLs) refuse HEAD: ask with GET, read headers only.
        return _http_request(uri, "GET", timeout_s, read)


# --------------------------------------------------------------------------- whole objects to disk


def download_to(uri: str, dest: Path, *, timeout_s: float = TIMEOUT_S, retries: int = RETRIES,
                backoff_s: float = BACKOFF_S) -> int:
    """Stream the object at `uri` (s3:// or http(s)://; no size limit) into the file `dest`,
    atomically; returns its size in bytes. For objects too big to hold, e.g. a tar shard."""
    from nds._io import atomic_file

    _check_retry_args(timeout_s, retries, backoff_s)
    with atomic_file(Path(dest)) as tmp:
        if uri_kind(uri) == "s3":
            bucket, key = _s3_parts(uri)
            _s3_call(uri, lambda c: c.download_file(bucket, key, str(tmp)))
        elif uri_kind(uri) == "http":
            def attempt() -> None:
                with open(tmp, "wb") as fh:
                    _http_request(uri, "GET", timeout_s, lambda resp: _read_limited(uri, resp, fh))

            _retrying(uri, attempt, retries=retries, backoff_s=backoff_s)
        else:
            raise InvalidInputError(f"{shown_uri(uri)} is a local file: read it in place")
        return tmp.stat().st_size
