"""Prefill and decode tokens/s, measured in a child process so its memory stays apart.

Generation needs the whole model, so this is the one measurement that loads every block at
once; running it in a subprocess keeps that out of the pipeline's own peak memory and gives
the serving footprint (peak RSS of the child) as a separate figure.

    python -m compress.evaluate.speed PATH --prompt 128 --new 32 --device cpu

The model runs where a user would run it: `compress.runtime.registry` opens PATH with the
runtime of its kind (our quantized artifacts on the CPU kernels of `compress.runtime.kernels`,
not the dequantize-per-call reference), and the result names it (`speed_runtime`).
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
def measure(decoder, prompt: int, new: int, device: torch.device, repeats: int = 3) -> dict:
    """Median prefill and greedy-decode tokens/s of `decoder` (`compress.runtime.registry.Decoder`)
    over `repeats` sequences of `prompt` random tokens and `new` generated ones, with the runtime
    that produced them."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, decoder.vocab_size, (1, prompt), generator=gen)
    decoder.prefill(ids[:, :8])  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        nxt = int(decoder.prefill(ids).argmax())
        t1 = time.perf_counter()
        for _ in range(new):
            nxt = int(decoder.step(nxt).argmax())
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        prefill.append(prompt / (t1 - t0))
        decode.append(new / (t2 - t1))
    return {"prefill_tokens_per_s": _median(prefill), "decode_tokens_per_s": _median(decode),
            "speed_runtime": decoder.label}


def main(argv: list[str] | None = None) -> None:
    from compress.evaluate.memory import PeakMemory
    from compress.runtime.registry import open_decoder

    # The default allocator here: mmap for every large temporary made decoding 3-4x slower.
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--artifact", action="store_true", help="ignored: the kind is read from PATH")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    with PeakMemory() as mem:
        res = measure(open_decoder(a.path, device), a.prompt, a.new, device)
    res["serving_peak_rss_mb"] = mem.peak / 2**20
    print(json.dumps(res))


def measure_in_subprocess(path: Path, artifact: bool, prompt: int, new: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "compress.evaluate.speed", str(path), "--prompt", str(prompt),
           "--new", str(new), "--device", device]
    proc = run_child(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"speed measurement failed for {path}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    die_with_parent()
    main()
