"""Publishing a built corpus to S3: upload the image arrays, point the catalog at them."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from nds._io import atomic_file
from nds.config import Workspace
from nds.corpus.read import CATALOG_FILE, IMAGES_DIR, load_catalog
from nds.errors import InvalidInputError, NotFoundError

log = logging.getLogger(__name__)


def publish_corpus(workspace: Workspace, url: str, *, keep_local: bool = True) -> dict:
    """Upload the corpus arrays to ``url`` (``s3://bucket/prefix``) and point the catalog at them.

    Each ``images/<dataset>.npy`` becomes ``<url>/images/<dataset>.npy``; the catalog's ``uri``
    and ``array`` columns are rewritten to those ``s3://`` objects (the new catalog replaces
    the old one by rename, after every upload succeeded). ``keep_local=False`` then deletes
    the local arrays: the images live in S3 only and readers fetch them into the cache.
    Publishing twice to the same place is a no-op.
    """
    from urllib.parse import urlparse

    from nds.platform import storage

    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidInputError(f"corpus store {url!r} must be an S3 location: s3://bucket/prefix")
    data_dir = workspace.data_dir
    catalog = load_catalog(data_dir, split=None)
    arrays = list(dict.fromkeys(catalog.column("array").to_pylist()))
    store = storage.S3Storage(parsed.netloc, parsed.path.strip("/"))
    mapping: dict[str, str] = {}
    for name in arrays:
        if name.startswith("s3://"):
            mapping[name] = name  # already published
            continue
        local = data_dir / name
        if not local.is_file():
            raise NotFoundError(f"corpus array {local} is missing: rebuild the corpus (`nds corpus build`) before publishing")
        mapping[name] = store.put_file(name, local)
        log.info("published %s -> %s", local, mapping[name])
    uris = [f"{mapping[a]}#{r}" for a, r in zip(catalog.column("array").to_pylist(), catalog.column("row").to_pylist())]
    table = catalog.set_column(catalog.schema.get_field_index("uri"), "uri", pa.array(uris, pa.string()))
    table = table.set_column(table.schema.get_field_index("array"), "array",
                             pa.array([mapping[a] for a in catalog.column("array").to_pylist()], pa.string()))
    with atomic_file(data_dir / CATALOG_FILE) as tmp:
        pq.write_table(table, tmp)
    removed = 0
    if not keep_local:
        for name in arrays:
            if not name.startswith("s3://") and (data_dir / name).exists():
                (data_dir / name).unlink()
                removed += 1
        images_dir = data_dir / IMAGES_DIR
        if images_dir.is_dir() and not any(images_dir.iterdir()):
            images_dir.rmdir()
    return {"objects": sorted(set(mapping.values())), "rows": table.num_rows, "local_removed": removed,
            "store": url.rstrip("/")}
