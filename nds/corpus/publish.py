"""Publishing a built corpus to S3: upload the packaged shards (or, for a corpus built before
packaged datasets were sources, the image arrays) and point the catalogs at them."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from nds._io import atomic_file, file_sha256, write_json
from nds.config import Workspace
from nds.corpus.read import CATALOG_FILE, IMAGES_DIR, PACKAGED_DIR, load_catalog
from nds.errors import InvalidInputError, NotFoundError

log = logging.getLogger(__name__)


def publish_corpus(workspace: Workspace, url: str, *, keep_local: bool = True) -> dict:
    """Upload the corpus to ``url`` (``s3://bucket/prefix``) and point the catalogs at it.

    Packaged datasets (registered sources whose uris are ``data/packaged/...`` shard members):
    each shard becomes ``<url>/packaged/<dataset>/<shard>.tar`` and those sources' catalogs name
    the ``s3://`` members; registered outside sources are left as they are (they already live
    where they live). A corpus built before packaged datasets were sources: each ``images/<dataset>.npy`` becomes ``<url>/images/<dataset>.npy``; the catalog's ``uri``
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
    if not (data_dir / CATALOG_FILE).exists():
        return _publish_shards(workspace, url, keep_local=keep_local)
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


def _publish_shards(workspace: Workspace, url: str, *, keep_local: bool) -> dict:
    """Upload every packaged shard, then rewrite each packaged source's catalog (one rename each)."""
    from urllib.parse import urlparse

    from nds.corpus.registry import CATALOG_FILE as SOURCE_CATALOG, INFO_FILE, list_sources, sources_root
    from nds.platform import storage

    parsed = urlparse(url)
    data_dir = workspace.data_dir
    local_prefix = f"{data_dir.name}/{PACKAGED_DIR}/"
    store = storage.S3Storage(parsed.netloc, parsed.path.strip("/"))
    tables, mapping = {}, {}
    for info in list_sources(data_dir):
        folder = sources_root(data_dir) / info["name"]
        table = pq.read_table(folder / SOURCE_CATALOG)
        shards = {u.partition("#")[0] for u in table.column("uri").to_pylist() if u.startswith(local_prefix)}
        if not shards:
            continue  # an outside source, or published already
        for shard in sorted(shards):
            name = shard[len(data_dir.name) + 1:]  # packaged/<dataset>/<shard>.tar
            local = data_dir / name
            if not local.is_file():
                raise NotFoundError(f"packaged shard {local} is missing: rebuild the corpus (`nds corpus build`) "
                                    "before publishing")
            mapping[shard] = store.put_file(name, local)
            log.info("published %s -> %s", local, mapping[shard])
        tables[info["name"]] = (folder, table, info)
    rows = 0
    for folder, table, info in tables.values():  # every upload succeeded: now point the catalogs at S3
        uris = [mapping.get(u.partition("#")[0], u.partition("#")[0]) + "#" + u.partition("#")[2]
                for u in table.column("uri").to_pylist()]
        table = table.set_column(table.schema.get_field_index("uri"), "uri", pa.array(uris, pa.string()))
        with atomic_file(folder / SOURCE_CATALOG) as tmp:
            pq.write_table(table, tmp)
        info = {**info, "location": f"{url.rstrip('/')}/{PACKAGED_DIR}/{info['name']}/",
                "catalog_sha256": file_sha256(folder / SOURCE_CATALOG)}
        write_json(folder / INFO_FILE, info)
        rows += table.num_rows
    removed = 0
    if not keep_local:
        for shard in mapping:
            (data_dir / shard[len(data_dir.name) + 1:]).unlink(missing_ok=True)
            removed += 1
        packaged = data_dir / PACKAGED_DIR
        for folder in [*sorted(packaged.glob("*/")), packaged] if packaged.is_dir() else []:
            if not any(folder.iterdir()):
                folder.rmdir()
    return {"objects": sorted(set(mapping.values())), "rows": rows, "local_removed": removed,
            "store": url.rstrip("/")}
