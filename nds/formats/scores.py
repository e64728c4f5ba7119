"""``scores.json``: the K numbers the client sends the server, written and validated here.

Only K numbers (plus, if the user opts in, the content hashes of their test images) ever
leave the client machine: ``scores.json`` holds no paths, labels or image counts. The client
validates with ``load_scores`` before it writes, and the server with the same function when
it reads, so both sides apply one set of checks. No torch here.
"""

from __future__ import annotations

import json
import logging
import math
import re
from datetime import datetime, timezone
from numbers import Real
from pathlib import Path

from nds._io import write_text
from nds._registry import SCORERS
from nds.errors import InvalidInputError, NotFoundError

log = logging.getLogger(__name__)

SCORES_FORMAT = 1
SCORES_FILE = "scores.json"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def write_scores(
    path: Path,
    *,
    bundle: dict,
    mode: str,
    scores,
    seconds_per_expert,
    hashes: list[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write ``scores.json`` atomically and return its content.

    scores, seconds_per_expert: (K,) floats, one per expert of ``bundle``.
    hashes: content hashes of the client's test images to exclude from the selection,
        only when the user asks (they reveal how many images there are); stored sorted
        and de-duplicated so they carry no order.
    overwrite: replace an existing file at ``path`` (refused by default: a scores.json is
        a record of what was scored; replacing it silently loses that).
    Nothing else about the client's data is written.
    """
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{path} is a folder: give a file name for scores.json (e.g. {path / SCORES_FILE})")
    if path.exists() and not overwrite:
        raise InvalidInputError(f"{path} already exists: write to a new file, or replace it with overwrite=True "
                                "(`nds client score --overwrite`)")
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
    write_text(path, json.dumps(doc, indent=2) + "\n")
    log.debug("wrote %s: %d %s scores for index %s", path, doc["k"], mode, doc["index_version"])
    return doc


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def load_scores(source) -> dict:
    """Read and validate a ``scores.json`` (a path, or an already parsed dict).

    Returns the document with exactly the known keys; raises InvalidInputError (NotFoundError
    for a missing file) naming the file and the fix for anything the server cannot trust.
    """
    if isinstance(source, dict):
        where, doc = "scores", source
    else:
        where = str(source)
        path = Path(source)
        if not path.is_file():
            raise NotFoundError(f"{where} not found; run `nds client score` to make scores.json")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"{where} is not valid JSON ({exc}); run `nds client score` again") from exc
    redo = "run `nds client score` again"
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{where}: expected a JSON object; {redo}")
    if doc.get("format") != SCORES_FORMAT or isinstance(doc.get("format"), bool):
        raise InvalidInputError(
            f"{where}: unsupported format {doc.get('format')!r} (this server reads format {SCORES_FORMAT}); {redo}"
        )
    for key in ("index_version", "mode"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise InvalidInputError(f"{where}: {key!r} must be a non-empty string, got {doc.get(key)!r}; {redo}")
    if doc["mode"] not in SCORERS:
        raise InvalidInputError(f"{where}: unknown mode {doc['mode']!r}; known modes: {', '.join(SCORERS.names())}")
    sha = doc.get("bundle_sha256")
    if not isinstance(sha, str) or not _SHA256_RE.match(sha.lower()):
        raise InvalidInputError(f"{where}: 'bundle_sha256' must be a 64-character hex sha256, got {sha!r}; {redo}")
    k = doc.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"{where}: 'k' must be a positive integer, got {k!r}; {redo}")
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
            raise InvalidInputError(f"{where}: 'seconds_per_expert' must be >= 0; {redo}")
        out["seconds_per_expert"] = secs
    if "created_at" in doc:
        if not isinstance(doc["created_at"], str):
            raise InvalidInputError(f"{where}: 'created_at' must be an ISO 8601 string; {redo}")
        out["created_at"] = doc["created_at"]
    if "exclude_sha256" in doc:
        out["exclude_sha256"] = _sha256_list(doc["exclude_sha256"], where, redo)
    unknown = sorted(set(doc) - set(out) - {"seconds_per_expert", "created_at", "exclude_sha256"})
    if unknown:
        log.warning("%s: ignoring unknown keys %s", where, unknown)
    return out


def _sha256_list(hashes, where: str, redo: str) -> list[str]:
    if not isinstance(hashes, list):
        raise InvalidInputError(
            f"{where}: 'exclude_sha256' must be a list of sha256 hex strings; {redo} with --emit-hashes"
        )
    for i, h in enumerate(hashes):
        if not isinstance(h, str) or not _SHA256_RE.match(h.lower()):
            raise InvalidInputError(
                f"{where}: exclude_sha256[{i}] = {h!r:.80} is not a 64-character hex sha256; {redo} with --emit-hashes"
            )
    return [h.lower() for h in hashes]


def _finite_list(values, k: int, name: str, where: str, redo: str) -> list[float]:
    if not isinstance(values, list):
        raise InvalidInputError(f"{where}: {name!r} must be a list of {k} numbers; {redo}")
    if len(values) != k:
        raise InvalidInputError(f"{where}: {name!r} has {len(values)} values but k = {k} (one per expert); "
                                "use scores made with the bundle of this index version")
    for i, v in enumerate(values):
        if not _is_number(v) or not math.isfinite(float(v)):
            raise InvalidInputError(f"{where}: {name}[{i}] = {v!r:.40} is not a finite number; {redo}")
    return [float(v) for v in values]
