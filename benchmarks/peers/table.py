"""The gptq_peers table: one Markdown file and one JSON file per run, plus the ratios the issue asks for."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

COLUMNS = ("row", "quantize s", "peak RSS MiB", "ppl", "KL", "top-1", "MB on disk")


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def ratios(done: dict[str, dict], metrics: dict[str, dict]) -> list[str]:
    """For W4 g64 and W3 g64: our GPTQ (defaults) against the better peer on each figure."""
    lines = []
    for level in ("w4 g64", "w3 g64"):
        ours = f"compress gptq {level}"
        peers = [n for n in done if n.endswith(f"gptq {level}") and not n.startswith("compress")]
        if ours not in done or not peers:
            continue
        m, r = metrics[ours], done[ours]
        best_q = min(peers, key=lambda n: metrics[n]["perplexity"])
        best_kl = min(peers, key=lambda n: metrics[n]["kl_divergence"])
        fastest = min(peers, key=lambda n: done[n]["quantize_seconds"])
        leanest = min(peers, key=lambda n: done[n]["peak_rss_mb"])
        lines += [
            f"- **{level.upper()}**: perplexity {m['perplexity']:.3f} vs {metrics[best_q]['perplexity']:.3f} "
            f"({best_q}; ratio {m['perplexity'] / metrics[best_q]['perplexity']:.3f}); "
            f"KL {m['kl_divergence']:.4f} vs {metrics[best_kl]['kl_divergence']:.4f} ({best_kl}; ratio "
            f"{m['kl_divergence'] / metrics[best_kl]['kl_divergence']:.2f}); quantize time "
            f"{r['quantize_seconds']:.0f} s vs {done[fastest]['quantize_seconds']:.0f} s ({fastest}; ratio "
            f"{r['quantize_seconds'] / done[fastest]['quantize_seconds']:.2f}); peak RSS "
            f"{r['peak_rss_mb']:.0f} vs {done[leanest]['peak_rss_mb']:.0f} MiB ({leanest}; ratio "
            f"{r['peak_rss_mb'] / done[leanest]['peak_rss_mb']:.2f})"
        ]
    return lines


def awq_ratios(done: dict[str, dict], metrics: dict[str, dict]) -> list[str]:
    """Issue 15's targets: our AWQ against llm-compressor's AWQ, our W8A8 against its SmoothQuant+GPTQ,
    and whether our best W4 g64 row has the lowest KL of every W4 g64 row."""
    def compare(ours: list[str], peer: str, label: str, kl_target: float, time_target: float, rss_target):
        ours = [n for n in ours if n in done]
        if peer not in done or not ours:
            return []
        best = min(ours, key=lambda n: metrics[n]["kl_divergence"])
        kl = metrics[best]["kl_divergence"] / metrics[peer]["kl_divergence"]
        t = done[best]["quantize_seconds"] / done[peer]["quantize_seconds"]
        rss = done[best]["peak_rss_mb"] / done[peer]["peak_rss_mb"]
        line = (f"- **{label}**: {best} KL {metrics[best]['kl_divergence']:.4f} vs {metrics[peer]['kl_divergence']:.4f} "
                f"({peer}): ratio **{kl:.2f}** (target <= {kl_target}); quantize time ratio **{t:.2f}** "
                f"(target <= {time_target}); peak RSS ratio **{rss:.2f}**")
        return [line + (f" (target <= {rss_target})" if rss_target else "")]

    w4 = [n for n in done if "w4 g64" in n]
    lines = compare([n for n in w4 if n.startswith("compress awq")], "llm-compressor awq w4 g64", "AWQ W4 g64",
                    0.8, 0.5, 0.5)
    lines += compare([n for n in done if n.startswith("compress smoothquant")], "llm-compressor smoothquant+gptq w8a8",
                     "W8A8", 1.0, 0.5, None)
    if w4:
        best = min(w4, key=lambda n: metrics[n]["kl_divergence"])
        lines.append(f"- **Lowest W4 g64 KL in the table**: {best} ({metrics[best]['kl_divergence']:.4f}); "
                     f"target: a compress row ({'met' if best.startswith('compress') else 'missed'})")
    return lines


def write_results(results_dir: Path, done: dict, metrics: dict, protocol: dict, calib_hash: str, machine: str,
                  stem: str = "gptq-peers") -> str:
    orig = metrics["original"]
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = [f"| original (fp32) | - | - | {orig['perplexity']:.3f} | 0 | 1.000 | {orig['bytes'] / 1e6:.1f} |"]
    for n, r in done.items():
        m = metrics[n]
        body.append(
            f"| {n} | {_fmt(r['quantize_seconds'], '.1f')} | {_fmt(r['peak_rss_mb'], '.0f')} | "
            f"{m['perplexity']:.3f} | {m['kl_divergence']:.4f} | {m['top1_agreement']:.3f} | {m['bytes'] / 1e6:.1f} |"
        )
    versions = sorted({r.get("version", "") for r in done.values()} - {""})
    invocations = sorted({r.get("invocation", "unrecorded") for r in done.values()})
    when = (f"All rows quantized in one invocation of the script (started {invocations[0]}), one after another."
            if len(invocations) == 1 else
            f"WARNING: rows come from {len(invocations)} invocations ({', '.join(invocations)}); "
            "their times were not measured side by side.")
    today = dt.date.today().isoformat()
    md = (
        f"# {'AWQ and W8A8' if stem == 'awq-peers' else 'GPTQ'} side by side on SmolLM2-135M-Instruct ({today})\n\n"
        f"Command: `GPTQMODEL_CPU_WORKERS=2 .venv/bin/python benchmarks/gptq_peers.py --suite {stem.split('-')[0]}` "
        f"(after `bash scripts/setup-peers.sh` and `bash scripts/setup-llmc.sh`).\n\n"
        f"Machine: {machine}. Versions: {', '.join(versions)}. {when}\n\n"
        f"Calibration: 64 x 512 Wikipedia windows, the same for every row (sha256 {calib_hash[:16]}...). "
        f"Evaluation: `{protocol['name']}` (sha256 {protocol['windows_sha256'][:16]}...), every artifact "
        "evaluated by the same code against the fp32 original. `quantize s` is the quantize step alone "
        "as each tool times it; `peak RSS` is the whole quantizing process (load, calibration, quantize, save). "
        "Ours: `compress gptq` rows use our defaults (damping 0.05, MSE range clip, static groups), with "
        "desc_act on unless the row says `no-act`; AWQ and SmoothQuant rows use their defaults (AWQ: duo "
        "scaling, 20-point grid searched on the first 16 calibration windows, clip search on; SmoothQuant: alpha 0.5). Peers use their defaults with the "
        "bits and group size shown.\n\n"
        + head + "\n".join(body) + "\n\n"
        + "\n".join(awq_ratios(done, metrics) if stem == "awq-peers" else ratios(done, metrics)) + "\n"
    )
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{stem}-{today}.md").write_text(md)
    (results_dir / f"{stem}-{today}.json").write_text(json.dumps(
        {"machine": machine, "protocol": protocol, "calibration_sha256": calib_hash,
         "rows": {n: {**done[n], **metrics[n]} for n in done}, "original": orig}, indent=2, default=str))
    return md
