"""One comparison per run: rows with quality, size, serving memory, GPU fit and Pareto marks.

`build(ctx)` turns a finished run context into a plain dict (written as comparison.json); the
writers below only read that dict, so they can be tested without running a model.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from compress.compare import pareto_front, ppl_increase, recommend
from compress.report import columns
from compress.report.columns import cell
from compress.evaluate.sanity import flagged_message
from compress.stages.context import as_json
from compress.serving import GIB, attention_shape, fits, load_gpus, safetensors_tensor_bytes, serving_need

_QUANT_KEYS = ("method", "bits", "group_size", "sym", "desc_act", "propagate")
_METRIC_KEYS = (
    "perplexity", "kl_divergence", "top1_agreement", "bytes", "bits_per_weight", "linear_bits_per_weight",
    "perplexity_ci95", "nll_se", "ppl_ratio", "ppl_ratio_ci95", "kl_divergence_se", "kl_median", "kl_p99",
    "kl_p999", "kl_max", "top1_agreement_se",
    "prefill_tokens_per_s", "decode_tokens_per_s", "serving_peak_rss_mb", "speed_runtime",
)


def _serving_cols(weights: int | None, shape, serving, gpus) -> dict:
    if weights is None:
        return {}
    need = serving_need(weights, shape, serving)
    fit = fits(need, gpus)
    return {
        "weights_bytes": need.weights_bytes, "kv_cache_bytes": need.kv_cache_bytes,
        "overhead_bytes": need.overhead_bytes, "serving_bytes": need.total_bytes,
        "fits_on": fit, "smallest_gpu": fit[0] if fit else None,
    }


def build(ctx) -> dict:
    cfg = ctx.cfg
    shape = attention_shape(ctx.loaded.config)
    gpus = load_gpus(cfg.serving.gpus)
    orig = {"name": "original", "status": "ok", "dtype": str(ctx.loaded.dtype).replace("torch.", "")}
    orig.update({k: v for k, v in ctx.original.as_row().items() if k in _METRIC_KEYS})
    orig.update(_serving_cols(safetensors_tensor_bytes(ctx.loaded.root), shape, cfg.serving, gpus))
    rows = [orig]
    for name, r in ctx.candidates.items():
        q = r.plan.q
        row = {"name": name, "status": "failed" if r.error else "ok", **{k: getattr(q, k, None) for k in _QUANT_KEYS}}
        row.update({k: v for k, v in r.metrics.as_row().items() if k in _METRIC_KEYS})
        row["quantize_seconds"] = r.quantize_seconds
        row["node"] = r.node
        if r.error:
            row["error"] = r.error
        elif r.artifact is not None:
            row.update(_serving_cols(safetensors_tensor_bytes(r.artifact), shape, cfg.serving, gpus))
        if r.allocation is not None:
            row["predicted_loss"] = r.allocation["predicted_loss"]
            row["target"] = r.allocation["target"]
        inc = ppl_increase(row, orig)
        if inc is not None:
            row["ppl_increase"] = inc
        rows.append(row)
    fronts = {"perplexity": pareto_front(rows, "bytes", "perplexity"),
              "kl_divergence": pareto_front(rows, "bytes", "kl_divergence")}
    for row in rows:
        row["pareto"] = [k for k, names in fronts.items() if row["name"] in names]
    rec = recommend(rows[1:], orig, cfg.select)
    return {
        "model": cfg.model.source,
        "protocol": as_json(ctx.protocol) or {},
        "sanity": ctx.sanity,
        "select": cfg.select.model_dump(),
        "recommendation": {"name": rec.name, "line": rec.line},
        "pareto": fronts,
        "serving": {
            **cfg.serving.model_dump(), "layers": shape.layers, "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim,
            "formula": "2 x layers x kv_heads x head_dim x context_length x batch x bytes(kv_dtype)",
            "gpus": [{"name": g.name, "memory_gb": g.memory_gb} for g in gpus],
        },
        "calibration": as_json(ctx.calibration),
        "shared": shared_work(ctx),
        "executor": ctx.executor,
        "rows": rows,
        "layers": {n: [vars(l) for l in r.layers] for n, r in ctx.candidates.items()},
        "allocations": {n: r.allocation for n, r in ctx.candidates.items() if r.allocation is not None},
    }


def shared_work(ctx) -> dict:
    """What the run did once for all candidates (the reason a sweep beats separate runs)."""
    return {
        "once": ["model load / GGUF conversion", "tokenizer", "calibration windows (tokenized once)",
                 "evaluation windows (tokenized once)", "original model's evaluation (final hidden states)",
                 "original model's speed"],
        "per_candidate": ["quantization (and with GPTQ its Hessians: with propagate: true each candidate "
                          "sees its own quantized outputs, so they differ by construction)",
                          "artifact export", "candidate evaluation and speed"],
        "stage_seconds": dict(ctx.timings),
    }


# ---- tables --------------------------------------------------------------------------------
def markdown(comp: dict) -> str:
    table = columns.markdown_table(comp["rows"], columns.COMPARISON_TABLE)
    s = comp["serving"]
    notes = [
        "",
        "`*` Pareto-optimal: no other row is both smaller on disk and better in perplexity or KL.",
        f"Serving memory: weights + KV cache ({s['context_length']} tokens x batch {s['batch']}, "
        f"{s['kv_dtype']}, {s['layers']} layers x {s['kv_heads']} KV heads x head_dim {s['head_dim']}) "
        f"+ {s['overhead_gb']} GiB overhead.",
        "",
        comp["recommendation"]["line"],
        *executor_lines(comp.get("executor") or {}),
    ]
    from compress.report.mixed import section

    warning = flagged_message(comp.get("sanity"))
    return ("\n".join([*([f"**{warning}**", ""] if warning else []), table, *notes]) + "\n"
            + section(comp["rows"], comp.get("allocations") or {}))


def executor_lines(ex: dict) -> list[str]:
    """Where the candidates ran, for a Ray sweep: per task its node, attempts and bytes moved."""
    if ex.get("kind") != "ray":
        return []
    streamed = "; artifacts streamed back to the driver" if ex.get("artifacts") == "stream" else ""
    lines = ["", f"Ran as Ray tasks ({ex['threads_per_task']} torch thread(s) each{streamed}); shared objects put once: "
             + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in ex["shared_object_bytes"].items()) + "."]
    for name, t in ex["tasks"].items():
        node = t.get("node") or {}
        if t.get("kept_finished"):
            lines.append(f"- {name}: kept from the interrupted run (--resume); evaluated by the driver on "
                         f"{node.get('host', '?')}")
            continue
        res = t.get("resources", {})
        lines.append(f"- {name}: node {node.get('host', '?')} ({str(node.get('node_id', '?'))[:12]}), "
                     f"{res.get('num_cpus')} CPU, {res.get('num_gpus')} GPU, {res.get('memory', 0) / 2**30:.2f} GiB asked; "
                     f"{t.get('bytes_to_task', 0) / 2**20:.2f} MiB to the task, " + _back(t)
                     + (f"; retried from block {t['resumed_at_block']}" if t.get("resumed_at_block") else "")
                     + (f"; {t['attempts']} attempts" if (t.get("attempts") or 1) > 1 else ""))
    return lines


def _back(t: dict) -> str:
    if "artifact_bytes" in t:  # executor.artifacts: stream
        return f"{t.get('bytes_from_task', 0) / 2**20:.2f} MiB back ({t['artifact_bytes'] / 2**20:.2f} MiB artifact streamed)"
    return f"{t.get('bytes_from_task', 0) / 1024:.1f} KiB back"


def terminal(comp: dict) -> str:
    keys = [k for k in columns.COMPARISON_TABLE if k != "pareto"]
    table = [[cell(r, "pareto")] + [cell(r, k) for k in keys] for r in comp["rows"]]
    header = [" "] + [columns.COLUMNS[k].header for k in keys]
    widths = [max(len(x[i]) for x in [header, *table]) for i in range(len(header))]
    widths[-1] = min(widths[-1], 60)
    fmt = lambda xs: "  ".join(x[:60].ljust(w) for x, w in zip(xs, widths)).rstrip()  # noqa: E731
    lines = [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, table)]
    lines += ["* Pareto-optimal (size vs perplexity or KL)", comp["recommendation"]["line"]]
    warning = flagged_message(comp.get("sanity"))
    return "\n".join([warning, *lines] if warning else lines)


CSV_KEYS = [
    "name", "status", "error", "method", "bits", "group_size", "sym", "perplexity", "perplexity_ci95",
    "ppl_increase", "ppl_ratio_ci95", "kl_divergence", "kl_divergence_se", "kl_median", "kl_p99", "kl_p999",
    "kl_max", "top1_agreement", "top1_agreement_se", "bytes", "bits_per_weight", "linear_bits_per_weight", "weights_bytes",
    "kv_cache_bytes", "overhead_bytes", "serving_bytes", "fits_on", "pareto", "prefill_tokens_per_s",
    "decode_tokens_per_s", "serving_peak_rss_mb", "speed_runtime", "quantize_seconds", "node",
]


def csv_text(comp: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_KEYS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in comp["rows"]:
        w.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()})
    return buf.getvalue()


def _atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write(comp: dict, out_dir: Path, html: bool = True) -> dict[str, Path]:
    """comparison.json/.csv/.md and, with `html`, the PNG plots and report.html."""
    import logging

    out_dir = Path(out_dir)
    paths = {"json": out_dir / "comparison.json", "csv": out_dir / "comparison.csv", "md": out_dir / "comparison.md"}
    _atomic(paths["json"], json.dumps(comp, indent=2, default=str) + "\n")
    _atomic(paths["csv"], csv_text(comp))
    _atomic(paths["md"], f"# Comparison: {comp['model']}\n\n" + markdown(comp))
    if not html:
        return paths
    try:
        from compress.report.plots import render_all
    except ImportError:
        logging.getLogger(__name__).warning(
            "matplotlib is not installed (pip install 'compress[report]'): report.html has no plots")
        pngs = {}
    else:
        pngs = render_all(comp)
    for name, data in pngs.items():
        paths[name] = out_dir / f"{name}.png"
        _atomic(paths[name], data)
    from compress.report.html import render_html

    paths["html"] = out_dir / "report.html"
    _atomic(paths["html"], render_html(comp, pngs))
    return paths
