"""The client side of NDS: read the private images, fetch the expert bundle, write scores.json.

Only K numbers (plus, if the user opts in, the content hashes of their test images) ever
leave the client machine: ``scores.json`` holds no paths, labels or image counts.

Images are brought to the corpus format (RGB uint8 32x32, see ``nds.corpus``) so experts see
client images exactly as they saw the source images and content hashes are comparable:

- alpha is composited on white; grey (and 16-bit grey) is replicated to RGB;
- an image that is already 32x32 is used as decoded, pixel for pixel (so an image taken
  from the corpus hashes to its catalog ``sha256``);
- any other size is resized with Pillow ``BILINEAR`` (antialiased when shrinking) so its
  longer side is 32 px, keeping the aspect ratio, then centred on a white 32x32 canvas.
  The corpus's own domains use other conventions (MNIST is padded with black), so a
  client image of another size never hashes to a corpus image; that only matters for
  ``--emit-hashes``, which should be fed the same 32x32 bytes the corpus stores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from numbers import Real
from pathlib import Path

import numpy as np

from nds.models import experts
from nds.config import IMAGE_SIZE
from nds.corpus.build import _sha256 as _image_sha256  # one hash function for corpus and client
from nds.errors import NDSError

log = logging.getLogger(__name__)

#: File name extensions read from a folder (lower case, as torchvision's ImageFolder).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: Largest width * height decoded. 50 MP covers any camera; a larger header is far more
#: likely a decompression bomb (a few KB of PNG that inflates to gigabytes) than a photo.
MAX_PIXELS = 50_000_000
#: Colour that alpha is composited on and that non-square images are padded with.
BACKGROUND = (255, 255, 255)
SCORES_FORMAT = 1
SCORES_FILE = "scores.json"
BUNDLE_FILE = "bundle.json"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: S3 reads retry transient failures (throttling, resets) a bounded number of times.
S3_MAX_ATTEMPTS = 5
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60


@dataclass(frozen=True)
class ClientData:
    """The client's images in corpus format.

    images: (n, 32, 32, 3) uint8 RGB.
    labels: (n,) str array (class folder names or the npz ``labels``), or None if unlabelled.
    class_names: sorted distinct labels ([] if unlabelled).
    paths: (n,) where each image came from (file path, or ``file.npz#i``); stays local.
    n_skipped / skipped: files that could not be used, as (path, reason).
    """

    images: np.ndarray
    labels: np.ndarray | None
    class_names: list[str]
    paths: list[str]
    n_skipped: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


# --------------------------------------------------------------------------- images


def _to_corpus_format(image) -> np.ndarray:
    """A decoded PIL image of any mode and size -> (32, 32, 3) uint8 (rules in the module doc)."""
    from PIL import Image

    if image.mode.startswith("I;16"):
        # 16-bit grey: keep the top 8 bits' worth of range instead of clipping at 255.
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ) or (image.mode in ("L", "RGB") and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        canvas.alpha_composite(rgba)
        image = canvas.convert("RGB")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        w, h = image.size
        scale = IMAGE_SIZE / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = image.resize(size, Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
        canvas.paste(small, ((IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2))
        image = canvas
    return np.asarray(image, dtype=np.uint8)


@contextlib.contextmanager
def _pixel_limit(max_pixels: int):
    """Make Pillow refuse (rather than warn about) any image over ``max_pixels`` at open time."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


class _Skip(Exception):
    """A file that cannot be used; the message is the reason reported to the user."""


def _decode_file(path: Path, max_pixels: int) -> np.ndarray:
    """One image file -> (32, 32, 3) uint8; raises _Skip(reason) if it cannot be used."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.stat().st_size == 0:
        raise _Skip("empty file")
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise _Skip(f"{w}x{h} pixels exceeds max_pixels={max_pixels} (possible decompression bomb)")
            im.seek(0)  # first frame of an animation
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos store their orientation in EXIF
            return _to_corpus_format(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Skip(f"possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError:
        raise _Skip("not a readable image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _Skip(f"corrupt image ({type(exc).__name__}: {exc})") from exc


def _list_folder(root: Path) -> tuple[list[tuple[Path, str | None]], list[tuple[str, str]]]:
    """(file, class name or None) in ImageFolder order, and files set aside with the reason."""
    def images_in(folder: Path, recursive: bool) -> list[Path]:
        found = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(
            p for p in found
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    top_level = images_in(root, recursive=False)
    if not class_dirs:
        return [(p, None) for p in top_level], []
    # ImageFolder layout: files next to the class folders have no class; they are reported.
    skipped = [(str(p), "outside the class folders") for p in top_level]
    files = []
    for d in class_dirs:
        members = images_in(d, recursive=True)
        if not members:
            log.warning("class folder %s holds no image files (%s); it is ignored", d, ", ".join(IMAGE_EXTENSIONS))
        files.extend((p, d.name) for p in members)
    return files, skipped


def _load_folder(root: Path, max_pixels: int, progress: bool) -> tuple[list, list, list, list]:
    from tqdm.auto import tqdm

    files, skipped = _list_folder(root)
    if not files and not skipped:
        raise NDSError(
            f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); give a folder with one "
            "subfolder per class (ImageFolder layout), a flat folder of images, or an .npz file"
        )
    images, labels, paths = [], [], []
    with _pixel_limit(max_pixels):
        for path, label in tqdm(files, desc="decode client images", unit="img", disable=not progress, leave=False):
            try:
                images.append(_decode_file(path, max_pixels))
            except _Skip as exc:
                skipped.append((str(path), str(exc)))
                continue
            labels.append(label)
            paths.append(str(path))
    return images, labels, paths, skipped


def _load_npz(path: Path, max_pixels: int, progress: bool) -> tuple[list, list, list, list]:
    from PIL import Image
    from tqdm.auto import tqdm

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise NDSError(f"{path} is not a readable .npz file ({exc}); save it with numpy.savez") from exc
    if "images" not in arrays:
        raise NDSError(
            f"{path} has no array named 'images' (found: {', '.join(sorted(arrays)) or 'none'}); "
            "save it with numpy.savez(path, images=..., labels=...)"
        )
    raw = arrays["images"]
    if raw.dtype != np.uint8 or raw.ndim not in (3, 4) or (raw.ndim == 4 and raw.shape[3] not in (1, 3, 4)):
        raise NDSError(
            f"{path}: 'images' must be uint8 of shape (n, H, W) or (n, H, W, C) with C in 1, 3, 4; "
            f"got {raw.dtype} {raw.shape} (convert to uint8 0-255 first)"
        )
    n = len(raw)
    if raw.shape[1] * raw.shape[2] > max_pixels:
        raise NDSError(f"{path}: images of {raw.shape[2]}x{raw.shape[1]} pixels exceed max_pixels={max_pixels}")
    labels: list = [None] * n
    if "labels" in arrays:
        lab = arrays["labels"]
        if lab.ndim != 1 or len(lab) != n:
            raise NDSError(f"{path}: 'labels' has shape {lab.shape} but there are {n} images; give one label per image")
        labels = [str(v) for v in lab.tolist()]
    if raw.ndim == 4 and raw.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3):
        # Already corpus format: no per-image work, bytes untouched.
        return list(raw), labels, [f"{path}#{i}" for i in range(n)], []
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    mode = "L" if raw.ndim == 3 else modes[raw.shape[3]]
    images = [
        _to_corpus_format(Image.fromarray(im[..., 0] if im.ndim == 3 and mode == "L" else im, mode))
        for im in tqdm(raw, desc="convert client images", unit="img", disable=not progress, leave=False)
    ]
    return images, labels, [f"{path}#{i}" for i in range(n)], []


def load_client_images(path: Path, *, max_pixels: int = MAX_PIXELS, progress: bool = True) -> ClientData:
    """Read the client's images from an ImageFolder tree, a flat folder, or an ``.npz``.

    path: a folder with one subfolder per class (labels = folder names; files are found
        recursively inside each class folder), a folder of images without subfolders
        (labels None), or an ``.npz`` with ``images`` ((n, H, W) or (n, H, W, C) uint8)
        and optional ``labels`` ((n,)).
    max_pixels: files whose header declares more pixels are skipped before decoding.
    Returns ClientData with images (n, 32, 32, 3) uint8. Unreadable, corrupt, empty and
    oversized files are skipped, counted and logged; no usable image at all is an error.
    """
    path = Path(path)
    if not path.exists():
        raise NDSError(f"{path} does not exist; give a folder of images (one subfolder per class) or an .npz file")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise NDSError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if path.is_dir():
        images, labels, paths, skipped = _load_folder(path, max_pixels, progress)
    elif path.suffix.lower() == ".npz":
        images, labels, paths, skipped = _load_npz(path, max_pixels, progress)
    else:
        raise NDSError(f"{path} is neither a folder nor an .npz file; give a folder of images or an .npz")
    if skipped:
        reasons: dict[str, int] = {}
        for _, reason in skipped:
            key = reason.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        log.warning("skipped %d of %d files in %s: %s", len(skipped), len(skipped) + len(images), path,
                    "; ".join(f"{n} {r}" for r, n in sorted(reasons.items())))
        for p, reason in skipped[:20]:
            log.warning("  skipped %s: %s", p, reason)
    if not images:
        examples = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise NDSError(
            f"no readable image in {path}: all {len(skipped)} files were skipped ({examples}); "
            f"give PNG/JPEG/BMP/GIF/WebP files of at most {max_pixels} pixels"
        )
    labelled = [lab is not None for lab in labels]
    if any(labelled) and not all(labelled):  # cannot happen by construction; guards future layouts
        raise NDSError(f"{path}: some images have labels and some do not")
    label_array = np.asarray(labels, dtype=str) if all(labelled) else None
    class_names = sorted(set(labels)) if label_array is not None else []
    data = ClientData(
        images=np.stack(images).astype(np.uint8, copy=False),
        labels=label_array,
        class_names=class_names,
        paths=paths,
        n_skipped=len(skipped),
        skipped=skipped,
    )
    log.info("client images: %d from %s (%d classes, %d skipped)", len(data), path, len(class_names), len(skipped))
    return data


def compute_image_hashes(images: np.ndarray) -> list[str]:
    """sha256 hex digests of ``images: (n, 32, 32, 3) uint8``, equal to the catalog ``sha256``."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise NDSError(
            f"hashes are taken of corpus-format images, uint8 (n, {IMAGE_SIZE}, {IMAGE_SIZE}, 3); "
            f"got {images.dtype} {images.shape} (load them with load_client_images)"
        )
    return [_image_sha256(im) for im in images]


# --------------------------------------------------------------------------- bundle fetch


def _expert_files(bundle: dict, where: str) -> list[str]:
    """File names listed in a bundle.json, refusing anything that would escape the bundle folder."""
    try:
        names = [e["file"] for e in bundle["experts"]]
    except (KeyError, TypeError) as exc:
        raise NDSError(f"{where} is not an expert bundle (no experts[].file); fetch the bundle again") from exc
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise NDSError(f"{where} lists expert file {name!r}, which is not a plain file name; refusing to fetch it")
    return names


def _fetch_local(source: Path, dest: Path) -> int:
    src_bundle = source / BUNDLE_FILE
    if not src_bundle.is_file():
        raise NDSError(f"{src_bundle} not found: point the source at an expert bundle folder (holding bundle.json)")
    bundle = _read_bundle_json(src_bundle.read_bytes(), str(src_bundle))
    total = 0
    for name in [BUNDLE_FILE, *_expert_files(bundle, str(src_bundle))]:
        if not (source / name).is_file():
            raise NDSError(f"{source / name} listed in bundle.json is missing; re-export the bundle")
        shutil.copyfile(source / name, dest / name)
        total += (dest / name).stat().st_size
    return total


def _read_bundle_json(raw: bytes, where: str) -> dict:
    try:
        bundle = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NDSError(f"{where} is not valid JSON ({exc}); fetch the bundle again") from exc
    if not isinstance(bundle, dict):
        raise NDSError(f"{where} is not an expert bundle (expected a JSON object)")
    return bundle


def _s3_client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # pragma: no cover - boto3 is a dependency
        raise NDSError("fetching from s3:// needs boto3: pip install boto3") from exc
    endpoint = os.environ.get("NDS_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_READ_TIMEOUT_S,
    )
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def _fetch_s3(url: str, dest: Path) -> int:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise NDSError(f"{url} names no bucket; use s3://bucket/prefix/to/experts")
    prefix = prefix.strip("/")
    key = lambda name: f"{prefix}/{name}" if prefix else name  # noqa: E731
    client = _s3_client()

    def download(name: str) -> None:
        try:
            client.download_file(bucket, key(name), str(dest / name))
        except NoCredentialsError as exc:
            raise NDSError(
                f"no AWS credentials to read {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            ) from exc
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NoSuchBucket"):
                raise NDSError(f"s3://{bucket}/{key(name)} not found; check the bundle URL") from exc
            raise NDSError(f"cannot read s3://{bucket}/{key(name)} ({code or exc}); check credentials and permissions") from exc
        except BotoCoreError as exc:
            raise NDSError(
                f"cannot reach S3 for {url} ({exc}); check NDS_S3_ENDPOINT_URL / AWS_ENDPOINT_URL and the network"
            ) from exc

    download(BUNDLE_FILE)
    bundle = _read_bundle_json((dest / BUNDLE_FILE).read_bytes(), f"{url}/{BUNDLE_FILE}")
    for name in _expert_files(bundle, f"{url}/{BUNDLE_FILE}"):
        download(name)
    return sum(p.stat().st_size for p in dest.iterdir())


def fetch_experts(source: str, out_dir: Path) -> dict:
    """Download an expert bundle into ``out_dir`` and verify every checksum; return bundle.json.

    source: a local bundle folder (or ``file://`` URL) or ``s3://bucket/prefix``. S3 uses
        the standard AWS credential chain; ``NDS_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``)
        points it at another S3 server. A DVC remote is not supported: ``dvc pull`` the
        experts stage and pass the folder instead.
    out_dir: must not exist or be empty. Files land in a sibling temporary folder that is
        renamed into place only after the checksums verify, so a failed fetch leaves nothing.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise NDSError(f"{out_dir} already exists and is not empty; choose a new folder or delete it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        source = str(source)
        if source.startswith("s3://"):
            n_bytes = _fetch_s3(source, tmp)
        elif "://" in source and not source.startswith("file://"):
            raise NDSError(f"unsupported bundle source {source!r}; use a local folder, file:// or s3://bucket/prefix")
        else:
            local = Path(source[len("file://"):] if source.startswith("file://") else source)
            if not local.is_dir():
                raise NDSError(f"bundle source {local} is not a folder; give the experts folder or an s3:// URL")
            n_bytes = _fetch_local(local, tmp)
        bundle = experts.load_bundle(tmp, verify=True)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("fetched %d experts (%.1f MB) from %s to %s in %.1fs; checksums verified",
             bundle["k"], n_bytes / 1e6, source, out_dir, time.perf_counter() - t0)
    return bundle


# --------------------------------------------------------------------------- scores.json


def write_scores(
    path: Path,
    *,
    bundle: dict,
    mode: str,
    scores,
    seconds_per_expert,
    hashes: list[str] | None = None,
) -> dict:
    """Write ``scores.json`` atomically and return its content.

    scores, seconds_per_expert: (K,) floats, one per expert of ``bundle``.
    hashes: content hashes of the client's test images to exclude from the selection,
        only when the user asks (they reveal how many images there are); stored sorted
        and de-duplicated so they carry no order.
    Nothing else about the client's data is written.
    """
    doc = {
        "format": SCORES_FORMAT,
        "index_version": bundle.get("index_version"),
        "bundle_sha256": bundle.get("bundle_sha256"),
        "mode": mode,
        "k": bundle.get("k"),
        "scores": [float(s) if _is_number(s) else s for s in scores],
        "seconds_per_expert": [round(float(s), 4) if _is_number(s) else s for s in seconds_per_expert],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if hashes is not None:
        doc["exclude_sha256"] = sorted({str(h).lower() for h in hashes})
    doc = load_scores(doc)  # the same checks the server applies, before anything is written
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s: %d %s scores for index %s", path, doc["k"], mode, doc["index_version"])
    return doc


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def load_scores(source) -> dict:
    """Read and validate a ``scores.json`` (a path, or an already parsed dict).

    Returns the document with exactly the known keys; raises NDSError naming the file and
    the fix for anything the server cannot trust.
    """
    from nds.client.scoring import SCORERS

    if isinstance(source, dict):
        where, doc = "scores", source
    else:
        where = str(source)
        path = Path(source)
        if not path.is_file():
            raise NDSError(f"{where} not found; run `nds client score` to make scores.json")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise NDSError(f"{where} is not valid JSON ({exc}); run `nds client score` again") from exc
    redo = "run `nds client score` again"
    if not isinstance(doc, dict):
        raise NDSError(f"{where}: expected a JSON object; {redo}")
    if doc.get("format") != SCORES_FORMAT or isinstance(doc.get("format"), bool):
        raise NDSError(f"{where}: unsupported format {doc.get('format')!r} (this server reads format {SCORES_FORMAT}); {redo}")
    for key in ("index_version", "mode"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise NDSError(f"{where}: {key!r} must be a non-empty string, got {doc.get(key)!r}; {redo}")
    if doc["mode"] not in SCORERS:
        raise NDSError(f"{where}: unknown mode {doc['mode']!r}; known modes: {', '.join(SCORERS)}")
    sha = doc.get("bundle_sha256")
    if not isinstance(sha, str) or not _SHA256_RE.match(sha.lower()):
        raise NDSError(f"{where}: 'bundle_sha256' must be a 64-character hex sha256, got {sha!r}; {redo}")
    k = doc.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise NDSError(f"{where}: 'k' must be a positive integer, got {k!r}; {redo}")
    out = {
        "format": SCORES_FORMAT,
        "index_version": doc["index_version"],
        "bundle_sha256": sha.lower(),
        "mode": doc["mode"],
        "k": k,
        "scores": _finite_list(doc.get("scores"), k, "scores", where, redo),
    }
    if "seconds_per_expert" in doc:
        secs = _finite_list(doc["seconds_per_expert"], k, "seconds_per_expert", where, redo)
        if any(s < 0 for s in secs):
            raise NDSError(f"{where}: 'seconds_per_expert' must be >= 0; {redo}")
        out["seconds_per_expert"] = secs
    if "created_at" in doc:
        if not isinstance(doc["created_at"], str):
            raise NDSError(f"{where}: 'created_at' must be an ISO 8601 string; {redo}")
        out["created_at"] = doc["created_at"]
    if "exclude_sha256" in doc:
        hashes = doc["exclude_sha256"]
        if not isinstance(hashes, list):
            raise NDSError(f"{where}: 'exclude_sha256' must be a list of sha256 hex strings; {redo} with --emit-hashes")
        for i, h in enumerate(hashes):
            if not isinstance(h, str) or not _SHA256_RE.match(h.lower()):
                raise NDSError(f"{where}: exclude_sha256[{i}] = {h!r:.80} is not a 64-character hex sha256; {redo} with --emit-hashes")
        out["exclude_sha256"] = [h.lower() for h in hashes]
    unknown = sorted(set(doc) - set(out) - {"seconds_per_expert", "created_at", "exclude_sha256"})
    if unknown:
        log.warning("%s: ignoring unknown keys %s", where, unknown)
    return out


def _finite_list(values, k: int, name: str, where: str, redo: str) -> list[float]:
    if not isinstance(values, list):
        raise NDSError(f"{where}: {name!r} must be a list of {k} numbers; {redo}")
    if len(values) != k:
        raise NDSError(f"{where}: {name!r} has {len(values)} values but k = {k} (one per expert); "
                       "use scores made with the bundle of this index version")
    for i, v in enumerate(values):
        if not _is_number(v) or not math.isfinite(float(v)):
            raise NDSError(f"{where}: {name}[{i}] = {v!r:.40} is not a finite number; {redo}")
    return [float(v) for v in values]
