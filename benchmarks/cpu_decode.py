"""Decode and prefill tokens/s on a CPU: the fp32 original, our quantized artifacts through the
dequantize-per-call reference (`QuantLinear`), and through the fast path
(`compress.runtime.kernels`), all in one process, one after the other; plus how far the fast
path's logits are from the reference's (greedy tokens, KL, max |logit difference|).

    .venv/bin/python benchmarks/cpu_decode.py [--prompt 128] [--new 32] [--repeats 3]

SmolLM2-135M-Instruct (fp32), RTN W4 g64 and W8 per channel, GPTQ-format artifacts. Writes
benchmarks/results/cpu-decode-DATE.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gptq_peers import MODEL, compress_version, machine  # noqa: E402

PROMPT_TEXT = ("The history of the river valley begins with the first farming villages, built on the "
               "terraces above the flood plain. Over the following centuries")


NAMES = ("rtn-w4-g64", "rtn-w8-ch")


def quantize(out: Path, reuse: bool) -> tuple[Path, dict[str, Path]]:
    """The fp32 model folder and the two artifacts (kept from an earlier run of this script
    with `reuse`: quantizing is not what is measured)."""
    from compress.config import parse_config
    from compress.pipeline import run

    if reuse and all((out / n / "compress-manifest.json").is_file() for n in NAMES):
        return _original_folder(), {n: out / n for n in NAMES}
    cfg = parse_config({
        "model": {"source": MODEL, "dtype": "float32"},
        "calibration": {"dataset": "wikipedia", "nsamples": 4, "seqlen": 128},
        "quantize": {"method": "rtn", "sym": True},
        "candidates": [{"name": "rtn-w4-g64", "bits": 4, "group_size": 64},
                       {"name": "rtn-w8-ch", "bits": 8, "group_size": -1}],
        "export": {"format": "gptq", "output_dir": str(out), "overwrite": True},
        "evaluate": {"enabled": False}, "report": {"print": False, "html": False},
    })
    ctx = run(cfg, out)
    return ctx.loaded.root, {n: r.artifact for n, r in ctx.candidates.items()}


def _original_folder() -> Path:
    from compress.config import ModelConfig
    from compress.stages.load import resolve_folder

    return resolve_folder(ModelConfig(source=MODEL, dtype="float32"))


def reference(path: Path):
    from compress.formats.artifact import open_artifact
    from compress.runtime.kernels import REFERENCE
    from compress.runtime.torch_runtime import TorchDecoder

    model = open_artifact(path, torch.device("cpu"), torch.float32).materialize_all()
    return TorchDecoder(model, REFERENCE, torch.device("cpu"), {})


def fidelity(fast, ref, ids: torch.Tensor, new: int) -> dict:
    """Both decoders fed the reference's greedy tokens: KL(ref || fast) and max |logit diff|
    per step, and the step where the fast path's own greedy choice first differs."""
    a, b = fast.prefill(ids), ref.prefill(ids)
    kls, diffs, first_diff = [], [], None
    for step in range(new + 1):
        lp, lq = torch.log_softmax(b.double(), -1), torch.log_softmax(a.double(), -1)
        kls.append(float((lp.exp() * (lp - lq)).sum()))
        diffs.append(float((a - b).abs().max()))
        if first_diff is None and int(a.argmax()) != int(b.argmax()):
            first_diff = step
        if step < new:
            tok = int(b.argmax())
            a, b = fast.step(tok), ref.step(tok)
    return {"kl_mean": sum(kls) / len(kls), "kl_max": max(kls), "max_abs_logit_diff": max(diffs),
            "greedy_identical_tokens": new + 1 if first_diff is None else first_diff, "greedy_steps": new + 1}


def main() -> None:
    from compress.evaluate.speed import measure
    from compress.runtime.registry import open_decoder
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--requantize", action="store_true", help="quantize again even where artifacts exist")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "cpu-decode")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    original, artifacts = quantize(args.out, reuse=not args.requantize)
    decoders = {"original fp32": open_decoder(original, cpu)}
    for name, path in artifacts.items():
        decoders[f"{name} reference"] = reference(path)
        decoders[f"{name} fast"] = open_decoder(path, cpu)
    tok = AutoTokenizer.from_pretrained(str(original))
    ids = torch.tensor([tok(PROMPT_TEXT)["input_ids"]])
    rows = {n: {"name": n, "speed_runtime": d.label, "prefill": [], "decode": []} for n, d in decoders.items()}
    # Round robin, one sequence per row per round: a load that drifts on a shared box then
    # weighs on every row alike.
    for k in range(args.repeats):
        for name, d in decoders.items():
            r = measure(d, args.prompt, args.new, cpu, repeats=1)
            rows[name]["prefill"].append(r["prefill_tokens_per_s"])
            rows[name]["decode"].append(r["decode_tokens_per_s"])
            print(f"[{time.strftime('%H:%M:%S')}] round {k + 1} {name}: prefill {r['prefill_tokens_per_s']:.0f}, "
                  f"decode {r['decode_tokens_per_s']:.1f} tok/s", flush=True)
    if not args.repeats:  # fidelity only
        for name in artifacts:
            print(name, fidelity(decoders[f"{name} fast"], decoders[f"{name} reference"], ids, args.new), flush=True)
        return
    for r in rows.values():
        r["prefill_tokens_per_s"] = sorted(r["prefill"])[len(r["prefill"]) // 2]
        r["decode_tokens_per_s"] = sorted(r["decode"])[len(r["decode"]) // 2]
    for name in artifacts:
        rows[f"{name} fast"].update(fidelity(decoders[f"{name} fast"], decoders[f"{name} reference"], ids, args.new))
    rows = list(rows.values())
    fp32 = rows[0]["decode_tokens_per_s"]
    lines = [f"# CPU decode: fp32 vs dequantize-per-call vs fast kernels ({dt.date.today().isoformat()})", "",
             f"Model: {MODEL} (fp32); RTN sym W4 g64 and W8 per channel, GPTQ-format artifacts.",
             f"Machine: {machine()}. compress {compress_version()}.",
             f"Prompt {args.prompt} random tokens, {args.new} greedy decode steps; median of {args.repeats} rounds, "
             "each round one sequence per row in turn, all rows in one process on a box shared with other jobs "
             "(only the ratios within this run mean anything).", "",
             "| row | runtime | prefill tok/s | decode tok/s | decode vs fp32 | KL(ref‖fast) mean / max | max abs logit diff | greedy tokens equal |",
             "|---|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        fid = (f"{r['kl_mean']:.2e} / {r['kl_max']:.2e} | {r['max_abs_logit_diff']:.3f} | "
               f"{r['greedy_identical_tokens']}/{r['greedy_steps']}") if "kl_mean" in r else "- | - | -"
        lines.append(f"| {r['name']} | {r['speed_runtime']} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / fp32:.2f}x | {fid} |")
    lines += ["", "Fidelity: the fast decoder and the reference are both fed the reference's greedy tokens after a "
              f"{ids.shape[1]}-token English prompt; KL and logit differences over the {args.new + 1} predicted "
              "positions; 'greedy tokens equal' counts the steps before their argmax first differs."]
    today = dt.date.today().isoformat()
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"cpu-decode-{today}.md").write_text("\n".join(lines) + "\n")
    (args.results / f"cpu-decode-{today}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
