"""Human-readable summaries of what a run made (CLI output and Prefect artifacts).

The Prefect artifacts are written for the operator who opens them in the UI: pictures are
embedded (PNG data URIs, so the browser needs nothing but the artifact), the manifest is a
link (presigned when it lives in S3) and checksums are given in full.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

#: How long the manifest links of a selection artifact stay valid when the manifest is in S3
#: (the most S3 allows) unless the request asked for a presign expiry of its own.
MANIFEST_LINK_EXPIRY_S = 7 * 24 * 3600
#: Images in a selection's montage (a random sample of the selected ones) and the grid's columns.
SELECTION_MONTAGE_IMAGES = 40
MONTAGE_COLUMNS = 10
#: Experts listed in a selection artifact (the rest are summed up in one line).
EXPERT_ROWS = 20


def index_summary_markdown(summary: dict, clusters: dict) -> str:
    """The index build as a table; figures the summary lacks (an index built by `dvc repro`) are left out."""
    acc = summary.get("rotation_accuracy") or []
    rows = [
        ("source images", summary.get("n_samples")),
        ("source datasets", summary.get("n_datasets")),
        ("clusters / experts", summary.get("k")),
        ("NMI(cluster, dataset)", _fixed(summary.get("nmi_dataset"))),
        ("expert rotation accuracy",
         f"{min(acc):.3f} .. {max(acc):.3f} (mean {sum(acc) / len(acc):.3f})" if acc else None),
        ("extract throughput", f"{summary['extract_images_per_second']} img/s"
         if summary.get("extract_images_per_second") else None),
    ]
    rows += [(f"time: {k}", f"{v:.1f} s") for k, v in (summary.get("stage_seconds") or {}).items()]
    rows += [("warehouse", _code(summary.get("warehouse"))), ("expert bundle", _code(summary.get("bundle"))),
             ("expert bundle in storage", _code(summary.get("bundle_uri")))]
    lines = [f"# NDS index `{summary['index_version']}`", "", "| figure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows if value is not None]
    lines += ["", "## Clusters", "", "| expert | images | main datasets |", "|---|---|---|"]
    for c, (size, mix) in enumerate(zip(clusters["sizes"], clusters["dataset_mix"])):
        top = ", ".join(f"{d} {n}" for d, n in sorted(mix.items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"| {c} | {size} | {top} |")
    return "\n".join(lines)


def index_summary_text(summary: dict) -> str:
    acc = summary["rotation_accuracy"]
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary["stage_seconds"].items())
    return "\n".join(
        [
            f"index version     {summary['index_version']}",
            f"source samples    {summary['n_samples']} from {summary['n_datasets']} domains",
            f"clusters/experts  {summary['k']}  (NMI with domain {summary['nmi_dataset']:.3f})",
            f"rotation accuracy {min(acc):.3f} .. {max(acc):.3f}",
            f"time per stage    {stages}",
            f"warehouse         {summary['warehouse']}",
            f"artifacts         {summary['artifacts']}",
            f"expert bundle     {summary['bundle']}",
            f"DVC versioned     {'yes (dvc.lock updated)' if summary['dvc_versioned'] else 'no (not a DVC repo)'}",
        ]
    )


def cluster_montage_markdown(png: bytes, index_version: str) -> str:
    return "\n".join([
        f"# What each expert of index `{index_version}` covers", "",
        "One row per expert: random members of its cluster, labelled with the cluster's main source dataset.", "",
        f"![cluster montage]({png_data_uri(png)})",
    ])


def current_index_report(ws) -> dict | None:
    """The current index's summary and cluster montage as markdown, from the workspace's files.

    For a server that comes up on an index built earlier (by the `index` flow, `nds index` or
    `dvc repro`). None when the workspace has no index yet.
    """
    bundle_path = ws.stage_dir("experts") / "bundle.json"
    clusters_path = ws.stage_dir("cluster") / "clusters.json"
    if not (bundle_path.is_file() and clusters_path.is_file()):
        return None
    bundle = json.loads(bundle_path.read_text())
    clusters = json.loads(clusters_path.read_text())
    summary_path = ws.artifacts_dir / "index_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if summary.get("index_version") != bundle["index_version"]:  # none, or written by an earlier build
        summary = {"index_version": bundle["index_version"], "k": bundle["k"],
                   "n_samples": int(sum(clusters["sizes"])), "nmi_dataset": clusters.get("nmi_dataset"),
                   "n_datasets": len({d for mix in clusters["dataset_mix"] for d in mix}),
                   "rotation_accuracy": [e["rotation_accuracy"] for e in bundle.get("experts", [])
                                         if "rotation_accuracy" in e],
                   "bundle": str(ws.stage_dir("experts"))}
    return {"index_version": bundle["index_version"],
            "summary": index_summary_markdown(summary, clusters),
            "montage": cluster_montage_markdown(cluster_montage_png(ws), bundle["index_version"])}


def selection_summary_markdown(summary: dict, *, links: dict[str, str] | None = None,
                               montage_png: bytes | None = None) -> str:
    """One selection for the operator: what was asked, what came out, where the manifest is."""
    params = summary["parameters"]
    asked = params.get("budget")
    budget = f"{summary['rows']} images"
    if asked is not None:
        budget += f" (budget {asked:g}: a count)" if asked >= 1 else f" (budget {asked:g}: a share of the eligible)"
    filters = ", ".join(params["datasets"]) if params.get("datasets") else "all datasets"
    location = summary["manifest_location"]
    if links:
        manifest = " · ".join(f"[{name}]({url})" for name, url in links.items())
        if summary.get("manifest_links_expire_at"):
            manifest += f" (links valid until {summary['manifest_links_expire_at']})"
        manifest += f"<br>`{location}`"
    else:
        manifest = f"`{location}`"
    local = summary.get("local_manifest") or (location if "://" not in location else None)
    rows = [
        ("selected", budget),
        ("eligible", f"{summary['n_eligible']} images of {filters}"
         + (f", {summary['n_excluded']} left out" if summary.get("n_excluded") else "")),
        ("index", f"`{summary['index_version']}`"),
        ("scores", f"{summary['mode']}; focus (temperature) {params.get('temperature')}, seed {params.get('seed')}, "
                   f"sampler {summary.get('sampler', params.get('method'))}"),
        ("manifest", manifest),
        ("manifest.csv sha256", f"`{summary['manifest_sha256']}`"),
        ("selection id", f"`{summary['selection_id']}`"),
    ]
    if local:
        rows.append(("client download", f"`nds client download --manifest {local} --out images/`"))
    if summary.get("presigned_urls"):
        info = summary["presigned_urls"]
        rows.append(("image links", f"`{info['file']}` beside the manifest, valid until {info['expires_at']}"))
    name = params.get("out_name")
    lines = [f"# Selection {name}" if name else "# Selection", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if montage_png:
        lines += ["", f"![a random sample of the selected images]({png_data_uri(montage_png)})"]
    lines += ["", "## Per source dataset", "", "| dataset | images | share |", "|---|---|---|"]
    total = max(summary["rows"], 1)
    for ds, n in sorted(summary["counts_per_dataset"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {ds} | {n} | {n / total:.1%} |")
    lines += ["", "## Per expert", "", "Weight: the expert's share of the draw (softmax of its score); images: how many "
              "of the selected images its cluster gave.", "", "| expert | images | weight |", "|---|---|---|"]
    weights = summary["expert_weights"]
    counts = sorted(summary["counts_per_expert"].items(), key=lambda kv: (-kv[1], int(kv[0])))
    for e, n in counts[:EXPERT_ROWS]:
        lines.append(f"| {e} | {n} | {_share(weights[int(e)])} |")
    if len(counts) > EXPERT_ROWS:
        rest = counts[EXPERT_ROWS:]
        lines.append(f"| {len(rest)} more | {sum(n for _, n in rest)} | {_share(sum(weights[int(e)] for e, _ in rest))} |")
    return "\n".join(lines)


def manifest_links(summary: dict, *, expires_s: int = MANIFEST_LINK_EXPIRY_S) -> dict[str, str]:
    """Links to the manifest files: presigned GET URLs for S3, file:// URLs otherwise.

    Sets summary["manifest_links_expire_at"] when the links expire.
    """
    from datetime import datetime, timedelta, timezone

    from nds.formats.manifest import CSV_NAME, PARQUET_NAME, SUMMARY_NAME

    location = summary["manifest_location"]
    names = (CSV_NAME, PARQUET_NAME, SUMMARY_NAME)
    if location.startswith("s3://"):
        from nds.platform import storage

        client = storage.s3_client()
        base = location.rstrip("/")
        summary["manifest_links_expire_at"] = (datetime.now(timezone.utc) + timedelta(seconds=expires_s)).isoformat(
            timespec="minutes")
        return {n: storage.presign_s3_uri(f"{base}/{n}", expires_s, client=client) for n in names}
    if location.startswith("file://"):
        return {n: f"{location.rstrip('/')}/{n}" for n in names}
    return {n: (Path(location) / n).resolve().as_uri() for n in names}


def selection_montage_png(ws, manifest_dir, *, n: int = SELECTION_MONTAGE_IMAGES, seed: int = 0) -> bytes | None:
    """A grid of up to `n` selected images (a random sample of the manifest, in rank order)."""
    import numpy as np
    import pyarrow.parquet as pq

    from nds.corpus.read import load_images_at
    from nds.formats.manifest import PARQUET_NAME

    table = pq.read_table(Path(manifest_dir) / PARQUET_NAME, columns=["uri", "rank"]).sort_by("rank")
    if table.num_rows == 0:
        return None
    pick = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=min(n, table.num_rows), replace=False))
    uris = table.column("uri").take(pick).to_pylist()
    return image_grid_png(list(load_images_at(ws.data_dir, uris)), columns=MONTAGE_COLUMNS)


def image_grid_png(images: list, *, columns: int, scale: int = 2, pad: int = 2) -> bytes:
    """Images (H, W, 3 uint8, one size) side by side, `columns` a row, enlarged `scale` times."""
    from PIL import Image

    h, w = images[0].shape[:2]
    cw, ch = w * scale + pad, h * scale + pad
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (min(columns, len(images)) * cw + pad, rows * ch + pad), "white")
    for i, img in enumerate(images):
        tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (pad + (i % columns) * cw, pad + (i // columns) * ch))
    return _png_bytes(canvas)


def cluster_montage_png(ws, *, per_expert: int = 12, seed: int = 0) -> bytes:
    """A PNG grid, one row per expert, of random members of its cluster (what each expert covers).

    Rows are labelled by the expert id and its dominant domain.
    """
    return _png_bytes(_cluster_montage(ws, per_expert, seed)[0])


def render_cluster_montage(ws, out_path, *, per_expert: int = 12, seed: int = 0) -> dict:
    """`cluster_montage_png`, written atomically to `out_path`."""
    from nds._io import atomic_file

    image, k = _cluster_montage(ws, per_expert, seed)
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        Path(tmp).write_bytes(_png_bytes(image))
    return {"path": str(out_path), "experts": k, "per_expert": per_expert}


def _cluster_montage(ws, per_expert: int, seed: int):
    import numpy as np
    from PIL import Image, ImageDraw

    from nds.index._artifacts import load_assignments, load_index_images, load_index_order

    assignments = load_assignments(ws)
    index = load_index_order(ws)
    datasets = np.asarray(index.column("dataset").to_pylist(), dtype=object)
    rng = np.random.default_rng(seed)
    k = int(assignments.max()) + 1
    cell, label_w = 36, 130
    canvas = Image.new("RGB", (label_w + per_expert * cell, k * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for c in range(k):
        members = np.flatnonzero(assignments == c)
        pick = np.sort(rng.choice(members, size=min(per_expert, len(members)), replace=False))
        images = load_index_images(ws, pick, index)
        names, counts = np.unique(datasets[members].astype(str), return_counts=True)
        top = names[counts.argmax()]
        draw.text((4, c * cell + 4), f"expert {c}", fill="black")
        draw.text((4, c * cell + 18), f"{top} {counts.max() / len(members):.0%}", fill="gray")
        for j, img in enumerate(images):
            canvas.paste(Image.fromarray(img), (label_w + j * cell + 2, c * cell + 2))
    return canvas, k


def png_data_uri(png: bytes) -> str:
    """A PNG as a data: URI, which markdown artifacts show as an image with nothing to fetch."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _share(w: float) -> str:
    """A weight as a percentage, with the digits a small one needs (never "0.000" for a weight that drew)."""
    if w == 0:
        return "0 %"
    pct = 100 * w
    return f"{pct:.1f} %" if pct >= 0.1 else f"{pct:.2g} %"


def _fixed(value) -> str | None:
    return None if value is None else f"{value:.3f}"


def _code(value) -> str | None:
    return f"`{value}`" if value else None

