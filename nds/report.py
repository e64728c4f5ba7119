"""Human-readable summaries of what a run made (CLI output and Prefect artifacts)."""

from __future__ import annotations

from pathlib import Path


def index_summary_markdown(summary: dict, clusters: dict) -> str:
    acc = summary["rotation_accuracy"]
    lines = [
        f"# NDS index `{summary['index_version']}`",
        "",
        "| figure | value |",
        "|---|---|",
        f"| source samples | {summary['n_samples']} |",
        f"| domains | {summary['n_datasets']} |",
        f"| clusters / experts | {summary['k']} |",
        f"| NMI(cluster, domain) | {summary['nmi_dataset']:.3f} |",
        f"| expert rotation accuracy | {min(acc):.3f} .. {max(acc):.3f} (mean {sum(acc) / len(acc):.3f}) |",
        f"| extract throughput | {summary['extract_images_per_second']} img/s |",
    ]
    lines += [f"| time: {k} | {v:.1f} s |" for k, v in summary["stage_seconds"].items()]
    lines += [
        f"| warehouse | `{summary['warehouse']}` |",
        f"| expert bundle | `{summary['bundle']}` |",
        "",
        "## Clusters",
        "",
        "| expert | size | domain mix |",
        "|---|---|---|",
    ]
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


def selection_summary_markdown(summary: dict) -> str:
    lines = [
        f"# Selection `{summary['selection_id']}`",
        "",
        f"{summary['rows']} samples of {summary['n_eligible']} eligible, index `{summary['index_version']}`, "
        f"scores by `{summary['mode']}`, T={summary['parameters']['temperature']}, seed {summary['parameters']['seed']}.",
        "",
        f"Manifest: `{summary['manifest_location']}` (sha256 `{summary['manifest_sha256'][:16]}…`)",
        "",
        "| dataset | selected | share |",
        "|---|---|---|",
    ]
    total = max(summary["rows"], 1)
    for ds, n in sorted(summary["counts_per_dataset"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {ds} | {n} | {n / total:.1%} |")
    lines += ["", "| expert | selected | weight |", "|---|---|---|"]
    weights = summary["expert_weights"]
    for e, n in sorted(summary["counts_per_expert"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {e} | {n} | {weights[int(e)]:.3f} |")
    return "\n".join(lines)


def render_cluster_montage(ws, out_path, *, per_expert: int = 12, seed: int = 0) -> dict:
    """A PNG grid, one row per expert, of random members of its cluster (what each expert covers).

    Rows are labelled by the expert id and its dominant domain. Written atomically.
    """
    import os

    import numpy as np
    from PIL import Image, ImageDraw

    from nds.corpus.read import load_images_at
    from nds.index._artifacts import load_assignments, load_index_order

    assignments = load_assignments(ws)
    index = load_index_order(ws)
    uris = index.column("uri").to_pylist()
    datasets = np.asarray(index.column("dataset").to_pylist(), dtype=object)
    rng = np.random.default_rng(seed)
    k = int(assignments.max()) + 1
    cell, label_w = 36, 130
    canvas = Image.new("RGB", (label_w + per_expert * cell, k * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for c in range(k):
        members = np.flatnonzero(assignments == c)
        pick = np.sort(rng.choice(members, size=min(per_expert, len(members)), replace=False))
        images = load_images_at(ws.data_dir, [uris[i] for i in pick])
        names, counts = np.unique(datasets[members].astype(str), return_counts=True)
        top = names[counts.argmax()]
        draw.text((4, c * cell + 4), f"expert {c}", fill="black")
        draw.text((4, c * cell + 18), f"{top} {counts.max() / len(members):.0%}", fill="gray")
        for j, img in enumerate(images):
            canvas.paste(Image.fromarray(img), (label_w + j * cell + 2, c * cell + 2))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, out_path)
    return {"path": str(out_path), "experts": k, "per_expert": per_expert}
