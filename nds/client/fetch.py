"""Fetch an expert bundle to the client (a local folder, ``file://`` or ``s3://``) and verify it.

S3 goes through the project's one S3 client (``nds.platform.storage.s3_client``: standard
AWS credential chain, bounded retries and timeouts, ``NDS_S3_ENDPOINT_URL`` for another
server). Files land in a temporary sibling folder that becomes the bundle folder only after
every checksum verifies, so a failed fetch leaves nothing behind.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from nds._io import atomic_dir
from nds.errors import InvalidInputError, NotFoundError, StorageError
from nds.formats.bundle import BUNDLE_FILE, expert_files, load_bundle, parse_bundle
from nds.platform.storage import s3_client

log = logging.getLogger(__name__)


def _fetch_local(source: Path, dest: Path) -> int:
    src_bundle = source / BUNDLE_FILE
    if not src_bundle.is_file():
        raise NotFoundError(f"{src_bundle} not found: point the source at an expert bundle folder (holding bundle.json)")
    bundle = parse_bundle(src_bundle.read_bytes(), str(src_bundle))
    total = 0
    for name in [BUNDLE_FILE, *expert_files(bundle, str(src_bundle))]:
        if not (source / name).is_file():
            raise NotFoundError(f"{source / name} listed in bundle.json is missing; re-export the bundle")
        shutil.copyfile(source / name, dest / name)
        total += (dest / name).stat().st_size
    return total


def _fetch_s3(url: str, dest: Path) -> int:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise InvalidInputError(f"{url} names no bucket; use s3://bucket/prefix/to/experts")
    prefix = prefix.strip("/")
    key = lambda name: f"{prefix}/{name}" if prefix else name  # noqa: E731
    client = s3_client()

    def download(name: str) -> None:
        try:
            client.download_file(bucket, key(name), str(dest / name))
        except NoCredentialsError as exc:
            raise StorageError(
                f"no AWS credentials to read {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            ) from exc
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NoSuchBucket"):
                raise NotFoundError(f"s3://{bucket}/{key(name)} not found; check the bundle URL") from exc
            raise StorageError(
                f"cannot read s3://{bucket}/{key(name)} ({code or exc}); check credentials and permissions"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(
                f"cannot reach S3 for {url} ({exc}); check NDS_S3_ENDPOINT_URL / AWS_ENDPOINT_URL and the network"
            ) from exc

    download(BUNDLE_FILE)
    bundle = parse_bundle((dest / BUNDLE_FILE).read_bytes(), f"{url}/{BUNDLE_FILE}")
    for name in expert_files(bundle, f"{url}/{BUNDLE_FILE}"):
        download(name)
    return sum(p.stat().st_size for p in dest.iterdir())


def fetch_experts(source: str, out_dir: Path) -> dict:
    """Download an expert bundle into ``out_dir`` and verify every checksum; return bundle.json.

    source: a local bundle folder (or ``file://`` URL), ``s3://bucket/prefix`` or an HTTP URL
        (``nds serve``: ``http://HOST:8600/v1/bundle``). S3 uses
        the standard AWS credential chain; ``NDS_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``)
        points it at another S3 server. A DVC remote is not supported: ``dvc pull`` the
        experts stage and pass the folder instead.
    out_dir: must not exist or be empty. Files land in a sibling temporary folder that is
        renamed into place only after the checksums verify, so a failed fetch leaves nothing.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidInputError(f"{out_dir} already exists and is not empty; choose a new folder or delete it")
    t0 = time.perf_counter()
    source = str(source)
    with atomic_dir(out_dir) as tmp:
        if source.startswith("s3://"):
            n_bytes = _fetch_s3(source, tmp)
        elif source.startswith(("http://", "https://")):  # `nds serve` (<server>/v1/bundle) or any HTTP folder
            from nds.client.request import fetch_bundle_http
            n_bytes = fetch_bundle_http(source, tmp)
        elif "://" in source and not source.startswith("file://"):
            raise InvalidInputError(
                f"unsupported bundle source {source!r}; use a local folder, file://, s3://bucket/prefix or http(s)://"
            )
        else:
            local = Path(source[len("file://"):] if source.startswith("file://") else source)
            if not local.is_dir():
                raise NotFoundError(f"bundle source {local} is not a folder; give the experts folder or an s3:// URL")
            n_bytes = _fetch_local(local, tmp)
        bundle = load_bundle(tmp, verify=True)
    # debug: the caller reports the outcome (`nds client fetch-experts` prints it once)
    log.debug("fetched %d experts (%.1f MB) from %s to %s in %.1fs; checksums verified",
             bundle["k"], n_bytes / 1e6, source, out_dir, time.perf_counter() - t0)
    return bundle
