"""``bundle.json``: the self-describing, checksummed index of an expert bundle.

The expert bundle (a folder of ``expert_XXX.pt`` files and ``bundle.json``) is what clients
download. ``bundle.json`` records the network the experts share (architecture, input size,
feature size, preprocessing; from ``nds.models.experts.bundle_fields``), one entry per expert
file with its sha256, and ``bundle_sha256``, which ties a client's scores to this bundle.
It may also hold ``cluster_stats`` (``nds.index.cluster_stats``): a reference sample of every
cluster in the public extractor's feature space (int8 rows packed by ``pack_array``) for the
``features`` scorer; the checksum covers it.
No torch here: the server and the client read the document without loading a network.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np

from nds._io import file_sha256, write_text
from nds.errors import InvalidInputError, NotFoundError

BUNDLE_FORMAT = 1
BUNDLE_FILE = "bundle.json"
#: The input size of every bundle made before it was configurable (``train_experts.image_size``).
DEFAULT_INPUT_SIZE = 32


def write_bundle(
    bundle_dir: Path, *, index_version: str, network: dict, experts: list[dict], extra: dict | None = None
) -> dict:
    """Write ``bundle.json`` (atomically) describing the expert files already in ``bundle_dir``.

    network: architecture, input_size (the side of the images the experts were trained on, which
        clients score at), feature_dim and preprocessing of the experts
        (``nds.models.experts.bundle_fields(arch, input_size)``).
    experts: [{"expert": k, "file": ..., "sha256": ..., "n_images": ..., ...}] in expert order.
    """
    bundle = {
        "format": BUNDLE_FORMAT,
        "index_version": index_version,
        "k": len(experts),
        "architecture": network["architecture"],
        "input_size": network["input_size"],
        "feature_dim": network["feature_dim"],
        "preprocessing": network["preprocessing"],
        "experts": experts,
        **(extra or {}),
    }
    bundle["bundle_sha256"] = bundle_checksum(bundle)
    write_text(Path(bundle_dir) / BUNDLE_FILE, json.dumps(bundle, indent=2, sort_keys=True))
    return bundle


#: Keys of bundle.json that the checksum covers beside the index version and the expert files:
#: what a scorer reads, so a tampered statistic is refused like a tampered expert. A bundle
#: without them keeps the checksum it had before they existed.
CHECKED_EXTRAS = ("cluster_stats",)


def bundle_checksum(bundle: dict) -> str:
    """sha256 over the index version, the expert checksums and the scorers' statistics:
    what a client's scores are tied to.

    An input size other than the default is covered too (a client scoring at another size than
    the experts saw gets meaningless scores); a default-size bundle keeps the checksum it had
    before the size was configurable.
    """
    what = {"index_version": bundle["index_version"], "experts": [e["sha256"] for e in bundle["experts"]]}
    what.update({key: bundle[key] for key in CHECKED_EXTRAS if key in bundle})
    if bundle.get("input_size", DEFAULT_INPUT_SIZE) != DEFAULT_INPUT_SIZE:
        what["input_size"] = bundle["input_size"]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def pack_array(array) -> dict:
    """A numeric array as JSON: ``{"dtype", "shape", "base64"}`` of its little-endian bytes (exact, ~1.3x)."""
    a = np.asarray(array)
    if a.dtype.kind not in "fiu":
        raise InvalidInputError(f"only numeric arrays go into bundle.json, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return {"dtype": a.dtype.str, "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def unpack_array(packed: dict, where: str = "bundle.json") -> np.ndarray:
    """The array ``pack_array`` packed; InvalidInputError if the entry is malformed."""
    try:
        dtype = np.dtype(packed["dtype"])
        shape = tuple(int(d) for d in packed["shape"])
        raw = base64.b64decode(packed["base64"], validate=True)
        if dtype.kind not in "fiu" or len(raw) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError("size does not match shape")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where} holds a malformed packed array ({exc}); fetch the bundle again") from exc


def load_bundle(bundle_dir: Path, *, verify: bool = True) -> dict:
    """Read ``bundle.json``; with ``verify``, check every expert file against its checksum."""
    path = Path(bundle_dir) / BUNDLE_FILE
    if not path.exists():
        raise NotFoundError(f"{path} not found: point --experts at an expert bundle folder")
    try:
        bundle = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path} is not valid JSON ({exc}); fetch the bundle again") from exc
    if bundle.get("bundle_sha256") != bundle_checksum(bundle):
        raise InvalidInputError(f"{path} was modified (bundle checksum mismatch); fetch the bundle again")
    if verify:
        for e in bundle["experts"]:
            f = Path(bundle_dir) / e["file"]
            if not f.exists():
                raise NotFoundError(f"expert file {f} listed in bundle.json is missing; fetch the bundle again")
            if file_sha256(f) != e["sha256"]:
                raise InvalidInputError(
                    f"expert file {f} does not match bundle.json (tampered or corrupt); fetch the bundle again"
                )
    return bundle


def parse_bundle(raw: bytes, where: str) -> dict:
    """The JSON object in the bytes of a ``bundle.json`` (before its files are fetched)."""
    try:
        bundle = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{where} is not valid JSON ({exc}); fetch the bundle again") from exc
    if not isinstance(bundle, dict):
        raise InvalidInputError(f"{where} is not an expert bundle (expected a JSON object)")
    return bundle


def expert_files(bundle: dict, where: str) -> list[str]:
    """File names listed in a bundle.json, refusing anything that would escape the bundle folder."""
    try:
        names = [e["file"] for e in bundle["experts"]]
    except (KeyError, TypeError) as exc:
        raise InvalidInputError(f"{where} is not an expert bundle (no experts[].file); fetch the bundle again") from exc
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise InvalidInputError(
                f"{where} lists expert file {name!r}, which is not a plain file name; refusing to fetch it"
            )
    return names


def default_mode(bundle: dict) -> str:
    """The scorer a client uses without ``--mode``: ``combined`` where the bundle ships
    ``cluster_stats`` (the best related-domain share on in-domain and cross-domain tasks alike:
    benchmarks/cross_domain.py), else ``rotation`` (bundles made before they existed)."""
    return "combined" if bundle.get("cluster_stats") else "rotation"
