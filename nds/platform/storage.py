"""One storage interface for published artifacts: a local folder or an S3 (-compatible) bucket.

`NDS_STORAGE_URL` picks it: ``file:///srv/nds`` or ``s3://bucket/prefix``;
`NDS_S3_ENDPOINT_URL` points S3 at another server (MinIO, Ceph, a loopback test server).
Credentials come only from the environment (the standard AWS chain), never from here.

Keys are ``/``-separated paths under the storage root (``manifests/<id>/summary.json``).
Publishing is atomic: the object is written under a temporary key (S3) or file (local)
and then copied / renamed to its final key, so a reader never sees half a manifest.

This is the one S3 client of NDS (`s3_client`): failures surface as `NotFoundError` (no such
object) or `StorageError` (S3 or the network failed after the bounded retries).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import urlparse

from nds._io import atomic_file
from nds.errors import InvalidInputError, NDSError, NotFoundError, StorageError

log = logging.getLogger(__name__)

STORAGE_URL_ENV = "NDS_STORAGE_URL"
S3_ENDPOINT_ENV = "NDS_S3_ENDPOINT_URL"

#: Transient S3 failures (throttling, resets) are retried a bounded number of times;
#: with the timeouts below an unreachable endpoint fails in well under a minute.
S3_MAX_ATTEMPTS = 5
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 60

#: Presigned URLs longer than this are refused by S3 itself (SigV4 limit: 7 days).
MAX_PRESIGN_S = 7 * 24 * 3600


class Storage(Protocol):
    def put_file(self, key: str, path: Path) -> str: ...
    def get_file(self, key: str, path: Path) -> Path: ...
    def put_bytes(self, key: str, data: bytes) -> str: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def presign(self, key: str, expires_s: int) -> str: ...
    def uri(self, key: str) -> str: ...


def configured_storage_url() -> str | None:
    """The storage URL from the environment, or None when publishing is not configured."""
    return os.environ.get(STORAGE_URL_ENV) or None


def open_storage(url: str | None = None) -> "LocalStorage | S3Storage":
    """The storage at `url` (default: $NDS_STORAGE_URL): ``file:///path`` or ``s3://bucket/prefix``."""
    url = url or configured_storage_url()
    if not url:
        raise NDSError(f"no storage configured: set {STORAGE_URL_ENV}=file:///path or s3://bucket/prefix")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidInputError(f"{url}: a file URL names a local path, e.g. file:///srv/nds")
        return LocalStorage(Path(parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidInputError(f"{url} names no bucket: use s3://bucket/prefix")
        return S3Storage(parsed.netloc, parsed.path.strip("/"))
    raise InvalidInputError(f"unsupported storage URL {url!r}: use file:///path or s3://bucket/prefix")


def _clean_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or ".." in parts:
        raise InvalidInputError(f"storage key {key!r} must be a relative path without '..'")
    return "/".join(parts)


class LocalStorage:
    """Objects are files under `root`; os.replace makes each publish atomic."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def put_file(self, key: str, path: Path) -> str:
        with atomic_file(self._path(key)) as tmp:
            shutil.copyfile(path, tmp)
        return self.uri(key)

    def put_bytes(self, key: str, data: bytes) -> str:
        with atomic_file(self._path(key)) as tmp:
            tmp.write_bytes(data)
        return self.uri(key)

    def get_file(self, key: str, path: Path) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise NotFoundError(f"{self.uri(key)} not found")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)
        return Path(path)

    def get_bytes(self, key: str) -> bytes:
        src = self._path(key)
        if not src.is_file():
            raise NotFoundError(f"{self.uri(key)} not found")
        return src.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        return sorted(p.relative_to(self.root).as_posix() for p in files if ".tmp-" not in p.name)

    def presign(self, key: str, expires_s: int) -> str:
        raise InvalidInputError(
            f"storage {self.root.as_uri()} is a local folder: presigned URLs need S3 storage "
            f"({STORAGE_URL_ENV}=s3://bucket/prefix)"
        )


def s3_client():
    """A boto3 S3 client: bounded retries and timeouts, endpoint from $NDS_S3_ENDPOINT_URL."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # pragma: no cover - boto3 is a dependency
        raise NDSError("S3 storage needs boto3: pip install boto3") from exc
    endpoint = os.environ.get(S3_ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_READ_TIMEOUT_S,
        signature_version="s3v4",
        # Path-style addressing works with every S3-compatible server, virtual hosts need DNS.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    # A fresh session per client: credentials are read from the environment each time, so a
    # long-running worker picks up rotated keys (boto3's default session keeps the first ones).
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


class S3Storage:
    """Objects under s3://bucket/prefix; publish = upload to a temp key, copy, delete temp."""

    def __init__(self, bucket: str, prefix: str = "", client=None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or s3_client()

    def _key(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _call(self, what: str, key: str, fn, *args, **kwargs):
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except S3UploadFailedError as exc:  # upload_file wraps the ClientError in its message only
            raise StorageError(f"cannot {what} {self.uri(key)} ({exc}): check credentials and permissions") from exc
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise NotFoundError(f"{self.uri(key)} not found") from exc
            if code == "NoSuchBucket":
                # Not a NotFoundError: `exists` must not answer False for a whole missing bucket.
                raise StorageError(f"bucket {self.bucket} does not exist: create it first") from exc
            raise StorageError(
                f"cannot {what} {self.uri(key)} ({code or exc}): check credentials and permissions"
            ) from exc
        except BotoCoreError as exc:
            endpoint = self.client.meta.endpoint_url
            raise StorageError(
                f"cannot reach S3 at {endpoint} to {what} {self.uri(key)} ({exc}): "
                f"check {S3_ENDPOINT_ENV}, credentials and the network"
            ) from exc

    def _publish(self, key: str, upload) -> str:
        final = self._key(key)
        tmp = f"{final}.tmp-{secrets.token_hex(8)}"
        self._call("write", key, upload, tmp)
        try:
            self._call("publish", key, self.client.copy_object, Bucket=self.bucket, Key=final,
                       CopySource={"Bucket": self.bucket, "Key": tmp})
        except NDSError:
            # The store failed mid-publish: retrying the delete would only double the wait.
            # A leftover temp key is harmless: every reader skips `.tmp-` keys.
            log.warning("publish failed; temporary object s3://%s/%s may remain", self.bucket, tmp)
            raise
        try:
            self.client.delete_object(Bucket=self.bucket, Key=tmp)
        except Exception:
            log.warning("could not delete temporary object s3://%s/%s", self.bucket, tmp)
        return self.uri(key)

    def put_file(self, key: str, path: Path) -> str:
        return self._publish(key, lambda tmp: self.client.upload_file(str(path), self.bucket, tmp))

    def put_bytes(self, key: str, data: bytes) -> str:
        return self._publish(key, lambda tmp: self.client.put_object(Bucket=self.bucket, Key=tmp, Body=data))

    def get_file(self, key: str, path: Path) -> Path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._call("read", key, self.client.download_file, self.bucket, self._key(key), str(path))
        return Path(path)

    def get_bytes(self, key: str) -> bytes:
        body = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return body["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self._call("inspect", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []

        def walk():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(o["Key"][strip:] for o in page.get("Contents", []))

        self._call("list", prefix or ".", walk)
        return sorted(k for k in keys if ".tmp-" not in k)

    def presign(self, key: str, expires_s: int) -> str:
        return presign_s3_uri(self.uri(key), expires_s, client=self.client)


def publish_folder(store: "Storage", folder: Path, prefix: str, *, last: str | None = None) -> str:
    """Copy every file of `folder` under `prefix/` in `store`; `last` (e.g. the index file) goes last.

    Each object is published atomically; writing the index file last means a reader that
    finds it finds everything it names.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".tmp-" not in p.name)
    files.sort(key=lambda p: p.name == last)
    for path in files:
        store.put_file(f"{prefix}/{path.relative_to(folder).as_posix()}", path)
    log.info("published %d files from %s to %s", len(files), folder, store.uri(prefix))
    return store.uri(prefix)


def fetch_object(uri: str, dest: Path) -> Path:
    """Download ``s3://bucket/key`` to `dest` atomically (temp file, then rename); bounded retries."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidInputError(f"{uri} is not an s3:// object URI")
    bucket = S3Storage(parsed.netloc, "")
    with atomic_file(Path(dest)) as tmp:
        bucket.get_file(parsed.path.lstrip("/"), tmp)
    return Path(dest)


def presign_s3_uri(uri: str, expires_s: int, *, client=None, must_exist: bool = False) -> str:
    """A presigned GET URL for ``s3://bucket/key``, valid `expires_s` seconds.

    must_exist: check the object first (a URL to a missing object fails only at download).
    """
    if not 1 <= int(expires_s) <= MAX_PRESIGN_S:
        raise InvalidInputError(
            f"presign expiry {expires_s}s must lie in [1, {MAX_PRESIGN_S}] (S3 allows 7 days at most)"
        )
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidInputError(f"{uri} is not an s3:// object URI")
    client = client or s3_client()
    if must_exist:
        store = S3Storage(parsed.netloc, "", client=client)
        if not store.exists(parsed.path.lstrip("/")):
            raise NotFoundError(f"{uri} is not in the store: push the data first (`dvc push`)")
    return client.generate_presigned_url(
        "get_object", Params={"Bucket": parsed.netloc, "Key": parsed.path.lstrip("/")}, ExpiresIn=int(expires_s)
    )


def dvc_object_uri(root: Path, path: str) -> str:
    """Where the DVC remote keeps the workspace file `path` (e.g. ``data/images/mnist.npy``).

    An ``s3://`` URI for an S3 remote, a local path otherwise. Files inside a tracked folder
    resolve too (DVC reads the folder listing from its cache).
    """
    try:
        import dvc.api
        from dvc.exceptions import DvcException
    except ImportError as exc:  # pragma: no cover - dvc is a dependency
        raise NDSError("locating corpus objects needs dvc: pip install dvc dvc-s3") from exc
    try:
        return dvc.api.get_url(path, repo=str(root))
    except DvcException as exc:
        raise NDSError(
            f"DVC cannot locate {path} in {root} ({exc}): configure a default remote "
            "(`dvc remote add -d NAME s3://bucket/prefix`) and track the corpus (`dvc add data`)"
        ) from exc


def default_dvc_remote(root: Path) -> tuple[str, str] | None:
    """(name, url) of the workspace's default DVC remote, or None (none set / not a DVC repo)."""
    if not (Path(root) / ".dvc").is_dir():
        return None
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return None
        remote = repo.config["remote"].get(name)
        if remote is None:
            raise NDSError(f"DVC's default remote {name!r} is not defined in {root}/.dvc/config: `dvc remote add`")
        return name, remote["url"]


# --------------------------------------------------------------------------- DuckDB on S3


def httpfs_extension_path() -> Path:
    """The httpfs extension file shipped in the `duckdb-extension-httpfs` wheel."""
    import duckdb

    try:
        import duckdb_extension_httpfs
    except ImportError as exc:
        raise NDSError("reading S3 from DuckDB needs the httpfs extension: pip install duckdb-extension-httpfs") from exc
    path = (Path(duckdb_extension_httpfs.__file__).parent / "extensions" / f"v{duckdb.__version__}"
            / "httpfs.duckdb_extension")
    if not path.is_file():
        raise NDSError(
            f"duckdb-extension-httpfs has no build for duckdb {duckdb.__version__} ({path} missing): "
            f"install duckdb-extension-httpfs=={duckdb.__version__}"
        )
    return path


def duckdb_s3_connection(database: str = ":memory:"):
    """A DuckDB connection that reads/writes ``s3://`` Parquet with the environment's credentials.

    The extension is loaded from the wheel (``INSTALL httpfs`` would need the network);
    the endpoint comes from $NDS_S3_ENDPOINT_URL (path-style addressing, SSL per its scheme).
    """
    import duckdb

    key_id = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key_id or not secret:
        raise NDSError("DuckDB on S3 needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment")
    con = duckdb.connect(database)
    try:
        con.execute(f"LOAD '{httpfs_extension_path()}'")
        options = {"KEY_ID": key_id, "SECRET": secret,
                   "REGION": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        if os.environ.get("AWS_SESSION_TOKEN"):
            options["SESSION_TOKEN"] = os.environ["AWS_SESSION_TOKEN"]
        endpoint = os.environ.get(S3_ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            parsed = urlparse(endpoint)
            options["ENDPOINT"] = parsed.netloc or parsed.path
            options["URL_STYLE"] = "path"
            options["USE_SSL"] = parsed.scheme == "https"
        # CREATE SECRET takes no ? placeholders: quote each value as a SQL string literal.
        clauses = ", ".join(f"{k} {_sql_literal(v)}" for k, v in options.items())
        con.execute(f"CREATE OR REPLACE SECRET nds_s3 (TYPE s3, {clauses})")
    except Exception:
        con.close()
        raise
    return con


def _sql_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "'" + str(value).replace("'", "''") + "'"
