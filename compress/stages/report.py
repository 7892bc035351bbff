"""Stage: results.json and a Markdown table in the output folder, printed at the end.

Each artifact also receives `compress-results.json` (its own row, the original's row and the
evaluation protocol) so a model card can be written from the artifact alone.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from compress.report import columns
from compress.stages.context import as_json

log = logging.getLogger(__name__)

def rows_of(ctx) -> list[dict]:
    rows = [{"name": f"original ({ctx.loaded.dtype})".replace("torch.", ""), **ctx.original.as_row()}]
    for name, r in ctx.candidates.items():
        row = {"name": name, **r.metrics.as_row(), "quantize_seconds": r.quantize_seconds}
        if r.error:
            row["error"] = f"FAILED: {r.error}"
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    return columns.markdown_table(rows, columns.RUN_TABLE)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def results_of(ctx) -> dict:
    mem = ctx.memory
    return {
        "protocol": as_json(ctx.protocol) or {},
        "sanity": ctx.sanity,
        "rows": rows_of(ctx),
        "run": {
            "peak_rss_mb": mem.peak / 2**20 if mem else None,
            "baseline_rss_mb": mem.baseline / 2**20 if mem else None,
            "runtime_rss_mb": ctx.runtime_rss_mb,
            "stage_seconds": ctx.timings,
            "stage_peak_rss_mb": ctx.stage_peak_mb,
            "device": str(ctx.loaded.device) if ctx.loaded else None,
        },
        "layers": {
            name: [vars(l) for l in r.layers] for name, r in ctx.candidates.items()
        },
        "allocations": {name: r.allocation for name, r in ctx.candidates.items() if r.allocation is not None},
        "sensitivity": ctx.sensitivity,
    }


def stage_report(ctx) -> None:
    write_report(ctx)


def write_report(ctx) -> None:
    from compress.evaluate.sanity import flagged_message
    from compress.formats.seal import seal_json

    results = results_of(ctx)
    _write_json(ctx.out_dir / "results.json", results)
    run = results["run"]
    orig_bytes = ctx.original.bytes or 0
    warning = flagged_message(ctx.sanity)
    lines = [
        f"# compress run: {ctx.cfg.model.source}",
        "",
        *([f"**{warning}**", ""] if warning else []),
        markdown_table(results["rows"]),
        "",
        f"Evaluation protocol: {ctx.protocol.name if ctx.protocol else 'not run'}.",
    ]
    if run["peak_rss_mb"] is not None and run["runtime_rss_mb"] is not None:
        model_mb = run["peak_rss_mb"] - run["runtime_rss_mb"]
        lines.append(
            f"Peak resident memory of this run: {run['peak_rss_mb']:.0f} MB, of which "
            f"{run['runtime_rss_mb']:.0f} MB is the runtime before any weight is loaded (Python, "
            f"torch, transformers, the model skeleton) and {model_mb:.0f} MB the streamed model data: "
            f"{model_mb * 2**20 / max(orig_bytes, 1):.2f}x the "
            f"{orig_bytes / 2**20:.0f} MiB of original weights on disk (RSS in MiB)."
        )
    md = "\n".join(lines) + "\n"
    from compress.report.comparison import build
    from compress.report.mixed import section

    allocations = {n: r.allocation for n, r in ctx.candidates.items() if r.allocation is not None}
    if allocations:  # the comparison's rows carry the bytes and the GPUs each candidate fits
        md += section(build(ctx)["rows"], allocations)
    if ctx.cfg.report.markdown:
        (ctx.out_dir / "report.md").write_text(md)
    for name, r in ctx.candidates.items():
        if r.artifact is None:
            continue
        own = [row for row in results["rows"] if row["name"] in (name,) or row is results["rows"][0]]
        # Sealed: the manifest records its sha256, so a published card's numbers are verified.
        seal_json(r.artifact, "compress-results.json",
                  {"protocol": results["protocol"], "sanity": ctx.sanity, "rows": own, "this": name})
    if ctx.cfg.report.print:
        print(md)
    write_comparison(ctx)


def write_comparison(ctx) -> None:
    """comparison.json/.csv/.md, PNG plots and report.html (compress/report/); the table is printed."""
    from compress.report import comparison

    comp = comparison.build(ctx)
    paths = comparison.write(comp, ctx.out_dir, html=ctx.cfg.report.html)
    log.info("comparison written: %s", ", ".join(p.name for p in paths.values()))
    if ctx.cfg.report.print:
        print(comparison.terminal(comp))
