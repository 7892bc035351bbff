"""Prefill and decode tokens/s, measured in a child process so its memory stays apart.

Generation needs the whole model, so this is the one measurement that loads every block at
once; running it in a subprocess keeps that out of the pipeline's own peak memory and gives
the serving footprint (peak RSS of the child) as a separate figure.

    python -m compress.evaluate.speed PATH [--artifact] --prompt 128 --new 32 --device cpu
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from compress.children import die_with_parent, run_child


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


@torch.no_grad()
def measure(model, vocab: int, prompt: int, new: int, device: torch.device, repeats: int = 3) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt), generator=gen).to(device)
    model(input_ids=ids[:, :8], use_cache=False)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        t1 = time.perf_counter()
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(new):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        prefill.append(prompt / (t1 - t0))
        decode.append(new / (t2 - t1))
    return {"prefill_tokens_per_s": _median(prefill), "decode_tokens_per_s": _median(decode)}


def _load(path: Path, artifact: bool, device: torch.device):
    if artifact:
        from compress.formats.artifact import open_artifact

        sm = open_artifact(path, device, torch.float32 if device.type == "cpu" else torch.float16)
        return sm.materialize_all(), sm.config.vocab_size
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device.type == "cpu" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model, model.config.vocab_size


def main(argv: list[str] | None = None) -> None:
    from compress.evaluate.memory import PeakMemory

    # The default allocator here: mmap for every large temporary made decoding 3-4x slower.
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--artifact", action="store_true")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    with PeakMemory() as mem:
        model, vocab = _load(a.path, a.artifact, device)
        res = measure(model, vocab, a.prompt, a.new, device)
    res["serving_peak_rss_mb"] = mem.peak / 2**20
    print(json.dumps(res))


def measure_in_subprocess(path: Path, artifact: bool, prompt: int, new: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "compress.evaluate.speed", str(path), "--prompt", str(prompt),
           "--new", str(new), "--device", device] + (["--artifact"] if artifact else [])
    proc = run_child(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"speed measurement failed for {path}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    die_with_parent()
    main()
