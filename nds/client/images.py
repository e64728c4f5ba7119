"""The client's private images: decode them into the corpus format and hash them.

The images never leave the client machine (``nds.formats.scores`` holds what does).
Images are brought to the corpus format (RGB uint8 32x32, see ``nds.corpus``) so experts see
client images exactly as they saw the source images and content hashes are comparable:

``nds.corpus.decode`` (``decode_image`` + ``to_array``) does it, the same code the server's
extraction runs: alpha on white, grey to RGB, an image already 32x32 used pixel for pixel (so an
image taken from the corpus hashes to its catalog ``sha256``), any other size resized (longer side
32 px) and centred on a white canvas. The corpus's own domains use other conventions (MNIST is
padded with black), so a client image of another size never hashes to a corpus image; that only
matters for ``--emit-hashes``, which should be fed the same 32x32 bytes the corpus stores.

Experts trained at another size (a bundle's ``input_size``, ``train_experts.image_size``) see the
client's images decoded again from their files at that size (``client_images_at``), by the rules
the server used on its originals at that size, not the 32 px pixels scaled up.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nds.config import IMAGE_SIZE
from nds.corpus.decode import IMAGE_EXTENSIONS, MAX_PIXELS, UnusableImageError, decode_image, to_array
from nds.corpus.read import image_sha256  # one hash function for corpus and client
from nds.errors import InvalidInputError, NotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientData:
    """The client's images in corpus format.

    images: (n, 32, 32, 3) uint8 RGB.
    labels: (n,) str array (class folder names or the npz ``labels``), or None if unlabelled.
    class_names: sorted distinct labels ([] if unlabelled).
    paths: (n,) where each image came from (file path, or ``file.npz#i``); stays local.
    n_skipped / skipped: files that could not be used, as (path, reason).
    max_pixels: the limit the files were read under (``client_images_at`` reads them again under it).
    """

    images: np.ndarray
    labels: np.ndarray | None
    class_names: list[str]
    paths: list[str]
    n_skipped: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    max_pixels: int = MAX_PIXELS

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class DataLayout:
    """What ``load_client_images`` would read from a path, found without decoding any image.

    kind: "imagefolder" (one subfolder per class), "flat" (images without class folders,
        unlabelled) or "npz".
    n_images: image files (or npz images) found; class_names: sorted labels ([] if unlabelled).
    """

    path: Path
    kind: str
    n_images: int
    class_names: list[str]

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def describe(self) -> str:
        """E.g. '41 images in 10 classes (ImageFolder)' or '12 unlabelled images (a flat folder: no class sub-folders)'."""
        if self.kind == "flat":
            return f"{self.n_images} unlabelled images (a flat folder: no class sub-folders)"
        if not self.labelled:
            return f"{self.n_images} unlabelled images (an .npz without 'labels')"
        n = len(self.class_names)
        where = "ImageFolder" if self.kind == "imagefolder" else ".npz labels"
        return f"{self.n_images} images in {n} class{'es' if n != 1 else ''} ({where})"


def inspect_client_data(path: Path) -> DataLayout:
    """Check a client data path and describe it, without decoding: for checks before any work.

    Raises NotFoundError / InvalidInputError (naming the path and the fix) exactly where
    ``load_client_images`` would before decoding: a missing path, a folder without image
    files, a file that is not an .npz, an .npz without 'images' or with mismatched 'labels'.
    """
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist; give a folder of images (one subfolder per class) or an .npz file")
    if path.is_dir():
        files, skipped, empty = _list_folder(path)
        if not files and not skipped:
            raise InvalidInputError(_no_images_message(path))
        if not files:
            raise InvalidInputError(
                f"{path} has class sub-folders ({len(empty)}) but no image files inside them ({len(skipped)} beside "
                "them); "
                "move the images into one subfolder per class, or give a folder without subfolders"
            )
        labels = {label for _, label in files if label is not None}
        return DataLayout(path, "imagefolder" if labels or skipped else "flat", len(files), sorted(labels))
    if path.suffix.lower() != ".npz":
        raise InvalidInputError(f"{path} is neither a folder nor an .npz file; give a folder of images or an .npz")
    try:
        with np.load(path, allow_pickle=False) as z:  # a zip: the member list, then only the labels
            names = list(z.files)
            if "images" not in names:
                raise InvalidInputError(
                    f"{path} has no array named 'images' (found: {', '.join(sorted(names)) or 'none'}); "
                    "save it with numpy.savez(path, images=..., labels=...)"
                )
            labels = z["labels"] if "labels" in names else None
            n = _npz_length(z, "images")
    except (OSError, ValueError, EOFError) as exc:
        raise InvalidInputError(f"{path} is not a readable .npz file ({exc}); save it with numpy.savez") from exc
    if labels is not None and (labels.ndim != 1 or len(labels) != n):
        raise InvalidInputError(f"{path}: 'labels' has shape {labels.shape} but there are {n} images; give one label per image")
    class_names = sorted({str(v) for v in labels.tolist()}) if labels is not None else []
    return DataLayout(path, "npz", n, class_names)


def _npz_length(z, name: str) -> int:
    """Rows of array `name` in an open .npz, from its .npy header when numpy can (no array read)."""
    from numpy.lib import format as npformat

    readers = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}
    try:
        with z.zip.open(f"{name}.npy") as fh:
            shape = readers[npformat.read_magic(fh)](fh)[0]
    except (KeyError, AttributeError):  # another header version or member layout: read the array
        shape = z[name].shape
    return int(shape[0]) if shape else 0


def _no_images_message(root: Path) -> str:
    return (f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); give a folder with one "
            "subfolder per class (ImageFolder layout), a flat folder of images, or an .npz file")


def _to_corpus_format(image, size: int = IMAGE_SIZE) -> np.ndarray:
    """A decoded PIL image of any mode and size -> (size, size, 3) uint8 (rules in ``nds.corpus.decode``)."""
    return to_array(image, size)


def _npz_image(im: np.ndarray):
    """One image of an .npz 'images' array ((H, W) or (H, W, C), C in 1, 3, 4) as a PIL image."""
    from PIL import Image

    if im.ndim == 2:
        return Image.fromarray(im, "L")
    return Image.fromarray(im[..., 0] if im.shape[2] == 1 else im, {1: "L", 3: "RGB", 4: "RGBA"}[im.shape[2]])


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


def _decode_file(path: Path, max_pixels: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image file -> (size, size, 3) uint8; raises _Skip(reason) if it cannot be used."""
    try:
        return _to_corpus_format(decode_image(path.read_bytes(), max_pixels=max_pixels), size)
    except UnusableImageError as exc:
        raise _Skip(str(exc)) from exc


def _list_folder(root: Path) -> tuple[list[tuple[Path, str | None]], list[tuple[str, str]], list[Path]]:
    """(file, class name or None) in ImageFolder order, files set aside with the reason, empty class folders."""
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
        return [(p, None) for p in top_level], [], []
    # ImageFolder layout: files next to the class folders have no class; they are reported.
    skipped = [(str(p), "outside the class folders") for p in top_level]
    files, empty = [], []
    for d in class_dirs:
        members = images_in(d, recursive=True)
        if not members:
            empty.append(d)
        files.extend((p, d.name) for p in members)
    return files, skipped, empty


def _load_folder(root: Path, max_pixels: int, progress: bool) -> tuple[list, list, list, list]:
    from tqdm.auto import tqdm

    files, skipped, empty = _list_folder(root)
    if not files and not skipped:
        raise InvalidInputError(_no_images_message(root))
    for d in empty:
        log.warning("class folder %s holds no image files (%s); it is ignored", d, ", ".join(IMAGE_EXTENSIONS))
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
    from tqdm.auto import tqdm

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise InvalidInputError(f"{path} is not a readable .npz file ({exc}); save it with numpy.savez") from exc
    if "images" not in arrays:
        raise InvalidInputError(
            f"{path} has no array named 'images' (found: {', '.join(sorted(arrays)) or 'none'}); "
            "save it with numpy.savez(path, images=..., labels=...)"
        )
    raw = arrays["images"]
    if raw.dtype != np.uint8 or raw.ndim not in (3, 4) or (raw.ndim == 4 and raw.shape[3] not in (1, 3, 4)):
        raise InvalidInputError(
            f"{path}: 'images' must be uint8 of shape (n, H, W) or (n, H, W, C) with C in 1, 3, 4; "
            f"got {raw.dtype} {raw.shape} (convert to uint8 0-255 first)"
        )
    n = len(raw)
    if raw.shape[1] * raw.shape[2] > max_pixels:
        raise InvalidInputError(f"{path}: images of {raw.shape[2]}x{raw.shape[1]} pixels exceed max_pixels={max_pixels}")
    labels: list = [None] * n
    if "labels" in arrays:
        lab = arrays["labels"]
        if lab.ndim != 1 or len(lab) != n:
            raise InvalidInputError(f"{path}: 'labels' has shape {lab.shape} but there are {n} images; give one label per image")
        labels = [str(v) for v in lab.tolist()]
    if raw.ndim == 4 and raw.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3):
        # Already corpus format: no per-image work, bytes untouched.
        return list(raw), labels, [f"{path}#{i}" for i in range(n)], []
    images = [_to_corpus_format(_npz_image(im))
              for im in tqdm(raw, desc="convert client images", unit="img", disable=not progress, leave=False)]
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
        raise NotFoundError(f"{path} does not exist; give a folder of images (one subfolder per class) or an .npz file")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise InvalidInputError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if path.is_dir():
        images, labels, paths, skipped = _load_folder(path, max_pixels, progress)
    elif path.suffix.lower() == ".npz":
        images, labels, paths, skipped = _load_npz(path, max_pixels, progress)
    else:
        raise InvalidInputError(f"{path} is neither a folder nor an .npz file; give a folder of images or an .npz")
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
        raise InvalidInputError(
            f"no readable image in {path}: all {len(skipped)} files were skipped ({examples}); "
            f"give PNG/JPEG/BMP/GIF/WebP files of at most {max_pixels} pixels"
        )
    labelled = [lab is not None for lab in labels]
    if any(labelled) and not all(labelled):  # cannot happen by construction; guards future layouts
        raise InvalidInputError(f"{path}: some images have labels and some do not")
    label_array = np.asarray(labels, dtype=str) if all(labelled) else None
    class_names = sorted(set(labels)) if label_array is not None else []
    data = ClientData(
        images=np.stack(images).astype(np.uint8, copy=False),
        labels=label_array,
        class_names=class_names,
        paths=paths,
        n_skipped=len(skipped),
        skipped=skipped,
        max_pixels=max_pixels,
    )
    if class_names:
        what = f"{len(class_names)} class{'es' if len(class_names) != 1 else ''}"
    else:  # a flat folder or an .npz without labels: fine for rotation scoring, which needs none
        what = "unlabelled: " + ("a flat folder, no class sub-folders" if path.is_dir() else "no 'labels' in the .npz")
    log.info("client images: %d from %s (%s, %d skipped)", len(data), path, what, len(skipped))
    return data


def _image_source(path: str) -> tuple[Path, int | None] | None:
    """Where a ``ClientData.paths`` entry can be read again: (file, None), (.npz file, row), or None."""
    if path and Path(path).is_file():
        return Path(path), None
    file, sep, row = path.rpartition("#")
    if sep and row.isdigit() and file.lower().endswith(".npz") and Path(file).is_file():
        return Path(file), int(row)
    return None


def client_images_at(data: ClientData, size: int, *, progress: bool = False) -> np.ndarray:
    """The client's images at ``size`` px (an expert bundle's ``input_size``): (n, size, size, 3) uint8
    in ``data``'s order.

    At the corpus size, ``data.images`` itself. At another size the files behind ``data.paths``
    are decoded again at that size (the server decoded its originals the same way for experts
    trained at it). Images held only in memory (no readable file behind a path) are scaled from
    their corpus-format pixels instead, with a warning: the experts then see blurrier images
    than they were trained on.
    """
    from tqdm.auto import tqdm

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"image size must be a positive integer, got {size!r}")
    if size == IMAGE_SIZE:
        return data.images
    n = len(data.images)
    sources = [_image_source(p) for p in data.paths] if len(data.paths) == n else [None] * n
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    if any(s is None for s in sources):
        from PIL import Image

        log.warning("client images: %d of %d have no file to decode again at %d px; scaling their %d px pixels "
                    "instead (load them with load_client_images for the closest match)",
                    sum(s is None for s in sources), n, size, IMAGE_SIZE)
        for i, im in enumerate(data.images):
            out[i] = to_array(Image.fromarray(np.ascontiguousarray(im), "RGB"), size)
        return out
    npz: dict[Path, np.ndarray] = {}
    with _pixel_limit(data.max_pixels):
        for i, (file, row) in enumerate(tqdm(sources, desc=f"decode client images at {size} px", unit="img",
                                             disable=not progress, leave=False)):
            try:
                if row is None:
                    out[i] = _decode_file(file, data.max_pixels, size)
                    continue
                if file not in npz:
                    with np.load(file, allow_pickle=False) as z:
                        npz[file] = z["images"]
                out[i] = _to_corpus_format(_npz_image(npz[file][row]), size)
            except (_Skip, OSError, ValueError, KeyError, IndexError) as exc:
                raise InvalidInputError(f"{data.paths[i]} could not be read again at {size} px ({exc}); it changed "
                                        "since the images were loaded: load them again") from exc
    return out


def compute_image_hashes(images: np.ndarray) -> list[str]:
    """sha256 hex digests of ``images: (n, 32, 32, 3) uint8``: the index's ``pixel_sha256`` of the same
    image (the server decodes and letterboxes its originals the same way, `nds.corpus.decode`)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise InvalidInputError(
            f"hashes are taken of corpus-format images, uint8 (n, {IMAGE_SIZE}, {IMAGE_SIZE}, 3); "
            f"got {images.dtype} {images.shape} (load them with load_client_images)"
        )
    return [image_sha256(im) for im in images]
