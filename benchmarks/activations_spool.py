"""What keeping the calibration activations on disk costs and saves: GPTQ with
`calibration.activations: memory` and `disk` side by side, on SmolLM2-135M.

    .venv/bin/python benchmarks/activations_spool.py [--repeats 2] [--nsamples 64 128]

For each calibration size, the two settings run alternately (memory, disk, memory, disk, ...)
in their own processes, one at a time, with the settings of `gptq_peers.py`'s `compress gptq
w3 g64` row (W3 g64, desc_act, Wikipedia windows of 512 tokens). Figures: the quantize step
as the run reports it, the process's peak RSS (os.wait4), and whether the artifact's
`model.safetensors` is byte for byte the one the other setting wrote (manifest sha256).
Writes benchmarks/results/activations-spool-DATE.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gptq_peers import CALIB, compress_version, machine, run_ours  # noqa: E402

QUANTIZE = {"method": "gptq", "bits": 3, "group_size": 64, "sym": True, "desc_act": True}


def run_once(work: Path, nsamples: int, activations: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    calibration = {**CALIB, "nsamples": nsamples, "activations": activations}
    wall, peak, cand, _, manifest = run_ours(work, calibration, dict(QUANTIZE))
    return {"nsamples": nsamples, "activations": activations, "quantize_seconds": cand["quantize_seconds"],
            "peak_rss_mb": peak, "process_seconds": wall,
            "weights_sha256": manifest["outputs"]["model.safetensors"]["sha256"]}


def table(runs: list[dict]) -> str:
    lines = ["| calibration windows | activations | runs | quantize s (mean) | peak RSS MiB (max) | same weights |",
             "|---|---|---|---|---|---|"]
    summary = {}
    for n in sorted({r["nsamples"] for r in runs}):
        hashes = {r["weights_sha256"] for r in runs if r["nsamples"] == n}
        for mode in ("memory", "disk"):
            rs = [r for r in runs if r["nsamples"] == n and r["activations"] == mode]
            if not rs:
                continue
            secs = sum(r["quantize_seconds"] for r in rs) / len(rs)
            peak = max(r["peak_rss_mb"] for r in rs)
            summary[(n, mode)] = (secs, peak)
            lines.append(f"| {n} x {CALIB['seqlen']} | {mode} | {len(rs)} | {secs:.1f} | {peak:.0f} | "
                         f"{'yes' if len(hashes) == 1 else 'NO'} |")
    lines.append("")
    for n in sorted({r["nsamples"] for r in runs}):
        if (n, "memory") in summary and (n, "disk") in summary:
            (sm, pm), (sd, pd) = summary[(n, "memory")], summary[(n, "disk")]
            lines.append(f"- {n} windows: disk / memory quantize time {sd / sm:.2f}x, peak RSS {pd / pm:.2f}x "
                         f"({pd:.0f} vs {pm:.0f} MiB)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--nsamples", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "activations-spool")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    runs = []
    for n in args.nsamples:
        for k in range(args.repeats):
            for mode in ("memory", "disk"):
                print(f"[{time.strftime('%H:%M:%S')}] {n} windows, activations {mode}, run {k + 1}", flush=True)
                r = run_once(args.out / f"{n}-{mode}-{k}", n, mode)
                print(f"  {r['quantize_seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
                runs.append(r)
    today = dt.date.today().isoformat()
    cmd = " ".join([".venv/bin/python benchmarks/activations_spool.py", *sys.argv[1:]])
    md = "\n".join([
        f"# Calibration activations in memory vs on disk: GPTQ W3 g64 on SmolLM2-135M-Instruct ({today})", "",
        f"Command: `{cmd}`", "",
        f"Machine: {machine()}. Version: compress {compress_version()}. Each run is its own process, "
        "one at a time, settings alternating.", "",
        table(runs), "",
    ])
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"activations-spool-{today}.md").write_text(md)
    (args.results / f"activations-spool-{today}.json").write_text(json.dumps(runs, indent=2))
    print(md)


if __name__ == "__main__":
    main()
