"""Human-readable summaries of what a run made (CLI output and Prefect artifacts)."""

from __future__ import annotations


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
