"""Listing a source LOCATION into catalog entries, without fetching any object (WebDataset members
excepted: they arrive in their shard's stream, so a shard is read once, front to back).

``resolve(location, label_from)`` picks the kind from the location's form:

=====================================  ===========  ===============================  =======================
LOCATION                               kind         key (sample_id = NAME/key)       labels (--label-from)
=====================================  ===========  ===============================  =======================
local folder with class sub-folders    imagefolder  path relative to the folder      dirs: the class folder
local folder, no sub-folders           folder       file name                        none
``s3://bucket/prefix/``                s3           key relative to the prefix       dirs: next path segment
``.csv``/``.parquet`` with ``url``     table        ``key`` column, else the url     column: ``label``
(local, ``s3://`` or ``http(s)://``)
``.tar`` shards: one, a glob, or a     webdataset   ``<shard file>/<sample key>``,   column: ``.cls``,
folder / S3 prefix holding only them                ``.json`` "key" if given         ``.json`` "label", ``.txt``
=====================================  ===========  ===============================  =======================

Without ``--label-from`` the labels come from wherever the kind has them (``dirs`` for
sub-folders, ``column`` for a ``label`` column or WebDataset label members), else none.
Files and objects whose extension is not an image's are listed as ``not_image`` skips; hidden
files (a leading dot) and temporary ``.tmp-`` objects are ignored.

Link tables: a ``url`` may be ``http(s)://``, ``s3://``, ``file://`` or a path (relative paths
are taken from the table's folder). A url listed twice names one object: it is collapsed to its
first row (a ``duplicate_within`` skip). Duplicate ``key`` values are an error: two objects
cannot share one ``sample_id``. An empty url is an ``unreachable`` skip. An optional ``split`` column
(``source`` or ``holdout``) keeps held-out images in the catalog but out of the index.

WebDataset: members are grouped by key (the member path up to the first dot of its file name);
the image is the first ``jpg``/``jpeg``/``png``/``webp`` member; the label is ``.cls``, else a
``.json`` "label", else ``.txt``; the caption is ``.txt``, else a ``.json`` "caption"; a ``.json``
"key" names the sample independently of its shard (keys must then be unique over the shards) and
"split" is as a link table's column. A shard that is not a readable tar is one ``corrupt`` skip
(its members read before the damage stay).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from nds.corpus.decode import IMAGE_EXTENSIONS
from nds.errors import InvalidInputError, NDSError, NotFoundError, StorageError

log = logging.getLogger(__name__)

LABEL_FROM = ("dirs", "column", "none")
TABLE_SUFFIXES = (".csv", ".parquet")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: Member extensions taken as the image of a WebDataset sample (what img2dataset and webdataset write).
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_FORMS = ("give a folder of images, s3://bucket/prefix/, a .csv/.parquet link table with a `url` column, "
          "or .tar shards (a file, a glob or a folder of them)")


@dataclass(frozen=True)
class Entry:
    """One listed object. version None: ask `object_version` when it is fetched (link tables).

    data: the bytes, when the listing already read them (WebDataset members).
    skip: a reason known from the listing alone (not_image, duplicate_within, unreachable, corrupt).
    split: "source" or "holdout" (None: source).
    """

    key: str
    uri: str
    label: str | None = None
    caption: str | None = None
    version: str | None = None
    data: bytes | None = None
    skip: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class Listing:
    """What `resolve` found. total: entries to expect (None for WebDataset: known once streamed).

    shards: (shard uri, version) of a WebDataset, what `check` compares its rows against.
    """

    kind: str
    label_from: str
    entries: Iterable[Entry]
    total: int | None
    shards: tuple[tuple[str, str], ...] = ()
    remote: bool = False


def resolve(location: str, label_from: str | None = None) -> Listing:
    """List `location` (forms in the module doc); errors name the location and the fix."""
    location = str(location).strip()
    if label_from is not None and label_from not in LABEL_FROM:
        raise InvalidInputError(f"--label-from {label_from!r}: choose one of {', '.join(LABEL_FROM)}")
    if not location:
        raise InvalidInputError(f"empty --from: {_FORMS}")
    low = location.lower().split("?")[0]
    if low.endswith(TABLE_SUFFIXES):
        return _list_table(location, label_from)
    if low.endswith(SHARD_SUFFIXES) or (not _is_url(location) and glob.has_magic(location)):
        return _list_shards(location, label_from)
    if low.startswith("s3://"):
        return _list_s3(location, label_from)
    if _is_remote(location):
        raise InvalidInputError(f"{location}: an http(s) location must be a link table (.csv/.parquet) or a .tar "
                                "shard; give a bucket as s3://bucket/prefix/")
    return _list_folder(location, label_from)


def _is_url(location: str) -> bool:
    return "://" in location


def _is_remote(location: str) -> bool:
    return _is_url(location) and not location.lower().startswith("file://")


def normalize(location: str) -> str:
    """`location` with a local path (or glob) made absolute: what source.json keeps, so `check` runs from anywhere."""
    location = str(location).strip()
    return location if not location or _is_remote(location) else str(_local(location))


def _local(location: str) -> Path:
    return Path(location[len("file://"):] if location.lower().startswith("file://") else location).expanduser().absolute()


def file_version(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def _labels(kind: str, label_from: str | None, *, default: str, allowed: tuple[str, ...], location: str) -> str:
    """The effective --label-from: `default` when not given; an unsupported choice is an error."""
    chosen = default if label_from is None else label_from
    if chosen not in allowed:
        raise InvalidInputError(f"--label-from {chosen} does not apply to {location} ({kind}); use one of "
                                f"{', '.join(allowed)}")
    return chosen


# --------------------------------------------------------------------------- local folders


def _list_folder(location: str, label_from: str | None) -> Listing:
    root = _local(location)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise NotFoundError(f"{location} {what}; {_FORMS}")
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(folder, n) for n in sorted(names) if not n.startswith(".") and ".tmp-" not in n)
    images = [p for p in files if _is_image(p.name) and p.is_file()]
    if not images:
        shards = [p for p in files if _is_shard(p.name)]
        if shards:
            return shard_listing([(str(p), file_version(p)) for p in shards], label_from, location)
        raise InvalidInputError(f"{location} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) among its "
                                f"{len(files)} files; {_FORMS}")
    nested = any(len(p.relative_to(root).parts) > 1 for p in images)
    kind = "imagefolder" if nested else "folder"
    label_from = _labels(kind, label_from, default="dirs" if nested else "none",
                         allowed=("dirs", "none") if nested else ("none",), location=location)
    entries, readable = [], set(images)
    for path in files:
        rel = path.relative_to(root)
        if path not in readable:  # not an image by name, or a link to nothing
            entries.append(Entry(rel.as_posix(), str(path), skip="unreachable" if _is_image(path.name) else "not_image"))
            continue
        label = rel.parts[0] if label_from == "dirs" and len(rel.parts) > 1 else None
        entries.append(Entry(rel.as_posix(), str(path), label=label, version=file_version(path)))
    return Listing(kind, label_from, entries, len(entries))


# --------------------------------------------------------------------------- S3


def _s3_parts(location: str) -> tuple[str, str]:
    bucket, _, prefix = location[len("s3://"):].partition("/")
    if not bucket:
        raise InvalidInputError(f"{location}: give an S3 prefix as s3://bucket/prefix/")
    return bucket, prefix


def _s3_objects(location: str) -> list[tuple[str, str, int]]:
    """(key, ETag, size) of every object under the prefix of `location`, in key order."""
    from botocore.exceptions import BotoCoreError, ClientError

    from nds.platform.storage import S3_ENDPOINT_ENV, s3_client

    bucket, prefix = _s3_parts(location)
    client = s3_client()
    found = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.extend((o["Key"], str(o.get("ETag", "")).strip('"'), int(o.get("Size", 0)))
                         for o in page.get("Contents", []))
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise NotFoundError(f"{location}: bucket {bucket} does not exist; check the name") from None
        raise StorageError(f"cannot list {location} ({code or exc}): check the credentials and permissions") from None
    except BotoCoreError as exc:
        raise StorageError(f"cannot reach S3 at {client.meta.endpoint_url} to list {location} ({exc}): check "
                           f"{S3_ENDPOINT_ENV}, the credentials and the network") from None
    return sorted(o for o in found if not o[0].endswith("/") and ".tmp-" not in o[0])


def _list_s3(location: str, label_from: str | None) -> Listing:
    bucket, prefix = _s3_parts(location)
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # `s3://b/cats` must not also list `s3://b/cats2/...`
    location = f"s3://{bucket}/{prefix}"
    objects = _s3_objects(location)
    images = [o for o in objects if _is_image(o[0])]
    if not images:
        shards = [(f"s3://{bucket}/{key}", etag) for key, etag, _ in objects if _is_shard(key)]
        if shards:
            return shard_listing(shards, label_from, location)
        raise InvalidInputError(f"{location} holds no image objects ({', '.join(IMAGE_EXTENSIONS)}) among its "
                                f"{len(objects)} objects; {_FORMS}")
    nested = any("/" in key[len(prefix):] for key, _, _ in images)
    label_from = _labels("s3", label_from, default="dirs" if nested else "none",
                         allowed=("dirs", "none") if nested else ("none",), location=location)
    entries = []
    for key, etag, _ in objects:
        rel, uri = key[len(prefix):], f"s3://{bucket}/{key}"
        if not _is_image(key):
            entries.append(Entry(rel, uri, skip="not_image"))
            continue
        label = rel.split("/")[0] if label_from == "dirs" and "/" in rel else None
        entries.append(Entry(rel, uri, label=label, version=etag))
    return Listing("s3", label_from, entries, len(entries), remote=True)


# --------------------------------------------------------------------------- link tables


def _read_table(location: str):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from nds.corpus.objects import fetch_bytes

    data = fetch_bytes(location)
    try:
        if location.lower().split("?")[0].endswith(".parquet"):
            return pq.read_table(io.BytesIO(data))
        return pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInputError(f"{location} is not a readable link table ({exc}); write it as CSV or Parquet "
                                "with a `url` column") from None


def _column(table, name: str) -> list:
    import pyarrow as pa

    if name not in table.column_names:
        return [None] * table.num_rows
    return [None if v is None or v == "" else v for v in table.column(name).cast(pa.string()).to_pylist()]


def _list_table(location: str, label_from: str | None) -> Listing:
    table = _read_table(location)
    columns = table.column_names
    if "url" not in columns:
        raise InvalidInputError(f"{location} has no `url` column (columns: {', '.join(columns) or 'none'}); name "
                                "the column of image links `url` (optional: key, label, caption)")
    has_label = "label" in columns
    label_from = _labels("table", label_from, default="column" if has_label else "none",
                         allowed=("column", "none") if has_label else ("none",), location=location)
    urls, labels, captions = _column(table, "url"), _column(table, "label"), _column(table, "caption")
    splits = [_split(location, s) for s in _column(table, "split")]
    keys = _column(table, "key") if "key" in columns else None
    if keys is not None:
        _check_keys(location, keys)
    base = None if _is_remote(location) else _local(location).parent
    entries, seen = [], set()
    for i, url in enumerate(urls):
        key = keys[i] if keys is not None else url
        if url is None:
            entries.append(Entry(key or f"row-{i}", f"{location}#row={i}", skip="unreachable"))
            continue
        uri = url if _is_url(url) or base is None or Path(url).is_absolute() else os.path.normpath(base / url)
        if keys is None and url in seen:
            entries.append(Entry(url, uri, skip="duplicate_within"))
            continue
        seen.add(url)
        entries.append(Entry(key, uri, label=labels[i] if label_from == "column" else None, caption=captions[i],
                             split=splits[i]))
    return Listing("table", label_from, entries, len(entries), remote=True)


def _check_keys(location: str, keys: list) -> None:
    if any(k is None for k in keys):
        row = keys.index(None)
        raise InvalidInputError(f"{location}: row {row} has an empty `key`; give every row a key, or drop the "
                                "column (the url is the key then)")
    seen, dups = set(), []
    for k in keys:
        if k in seen:
            dups.append(k)
        seen.add(k)
    if dups:
        shown = ", ".join(repr(k) for k in sorted(set(dups))[:3])
        raise InvalidInputError(f"{location}: {len(dups)} duplicate `key` value(s) ({shown}); a key names one "
                                "image: make them unique, or drop the column (the url is the key then)")


# --------------------------------------------------------------------------- WebDataset shards


def _list_shards(location: str, label_from: str | None) -> Listing:
    from nds.corpus.objects import object_version

    if _is_remote(location):
        return shard_listing([(location, object_version(location))], label_from, location)
    if glob.has_magic(location):
        paths = sorted(Path(p).absolute() for p in glob.glob(os.path.expanduser(location)) if _is_shard(p))
        if not paths:
            raise NotFoundError(f"{location} matches no .tar shard; check the pattern (e.g. 'shards/*.tar')")
    else:
        paths = [_local(location)]
        if not paths[0].is_file():
            raise NotFoundError(f"{location} does not exist; {_FORMS}")
    return shard_listing([(str(p), file_version(p)) for p in paths], label_from, location)


def shard_listing(shards: list[tuple[str, str]], label_from: str | None, location: str) -> Listing:
    label_from = _labels("webdataset", label_from, default="column", allowed=("column", "none"), location=location)
    remote = any(_is_remote(uri) for uri, _ in shards)
    return Listing("webdataset", label_from, _shard_entries(shards, label_from), None, tuple(shards), remote)


def _shard_entries(shards: list[tuple[str, str]], label_from: str) -> Iterator[Entry]:
    import zlib

    for uri, version in shards:
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        try:
            with _open_stream(uri) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
                for key, members in _samples(tar):
                    yield _shard_entry(uri, version, f"{name}/{key}", members, label_from)
        except NDSError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            log.warning("shard %s is not a readable tar (%s); the rest of it is skipped", uri, exc)
            yield Entry(name, uri, version=version, skip="corrupt")


def _open_stream(uri: str):
    """A binary stream of the shard at `uri`: a local file, an S3 object's body, or HTTP bytes."""
    from nds.corpus.objects import fetch_bytes

    if uri.lower().startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        from nds.platform.storage import s3_client

        bucket, _, key = uri[len("s3://"):].partition("/")
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot read shard {uri} ({exc}): check the credentials and the network") from None
    if _is_remote(uri):
        return io.BytesIO(fetch_bytes(uri))
    path = _local(uri)
    if not path.is_file():
        raise NotFoundError(f"shard {uri} does not exist; check the path")
    return open(path, "rb")


def _samples(tar) -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
    """(sample key, {extension: (member name, bytes)}) per run of consecutive members sharing a key."""
    current, members = None, {}
    for info in tar:
        if not info.isfile():
            continue
        name = info.name.removeprefix("./")
        folder, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot or base.startswith("."):
            continue
        key = f"{folder}/{stem}" if folder else stem
        if key != current and current is not None:
            yield current, members
            members = {}
        current = key
        members.setdefault(ext.lower(), (name, tar.extractfile(info).read()))
    if current is not None:
        yield current, members


def _shard_entry(shard: str, version: str, key: str, members: dict, label_from: str) -> Entry:
    image = next((ext for ext in members if ext in SHARD_IMAGE_EXTENSIONS), None)
    if image is None:
        first = next(iter(members.values()))[0]
        return Entry(key, f"{shard}#{first}", version=version, skip="not_image")
    text = {ext: data.decode("utf-8", "replace").strip() for ext, (_, data) in members.items()
            if ext in ("cls", "txt")}
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"][1])
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
    label = None
    if label_from == "column":
        found = text.get("cls") or meta.get("label") or text.get("txt")
        label = None if found in (None, "") else str(found)
    caption = text.get("txt") or (str(meta["caption"]) if meta.get("caption") else None)
    if meta.get("key") not in (None, ""):
        key = str(meta["key"])
    name, data = members[image]
    return Entry(key, f"{shard}#{name}", label=label, caption=caption, version=version, data=data,
                 split=_split(shard, meta.get("split")))


def _split(location: str, value) -> str | None:
    """A row's split ("source" or "holdout"; None when not given); anything else is an error."""
    from nds.corpus.sources import HOLDOUT, SOURCE

    if value in (None, ""):
        return None
    if value not in (SOURCE, HOLDOUT):
        raise InvalidInputError(f"{location}: split {value!r} is not one of {SOURCE}, {HOLDOUT}; fix the split "
                                "column (or the .json \"split\") or leave it empty")
    return value
