"""Small I/O helpers every phase shares: atomic files and folders, content hashes, run ids.

Every write NDS makes goes through `atomic_file` or `atomic_dir`: readers see the old
content or the new, never a partial file, and a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

HASH_CHUNK = 1 << 20


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    The temporary name starts with a dot and holds `.tmp-`, which listings skip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`.

    An existing `path` is renamed aside first and deleted after the swap, so a crash
    between the two renames leaves the old folder under a `.old-` name, never half of each.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj, *, indent: int | None = 2, sort_keys: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def new_run_id(prefix: str) -> str:
    """`<prefix>-<UTC time>-<128 random bits>`: time-ordered and unguessable."""
    return f"{prefix}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(16)}"
