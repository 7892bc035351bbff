"""The predicted loss of one option of one layer, measured in the block walk, equals an
independent computation: the layer's inputs captured from the transformers model's own
forward, a slow per-group round-to-nearest, and 2/n sum ||(W - Q) x||^2 over every token."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.config import ModelConfig
from compress.mixed.sensitivity import measure
from compress.quantizers.base import QuantSpec
from compress.stages.load import load_model
from tiny_models import VOCAB


def slow_rtn(W: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Min/max round to nearest per (row, group), GPTQ's grid (range widened to hold 0), in
    float32 like the library: a symmetric grid puts the extremes on exact .5 ties, which
    float64 arithmetic would round the other way."""
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    Q = torch.empty(out_f, in_f, dtype=torch.float64)
    top = torch.tensor(2.0**bits - 1)
    zero_t = torch.tensor(0.0)
    for r in range(out_f):
        for g in range(0, in_f, gs):
            w = W[r, g : g + gs].float()
            lo, hi = torch.minimum(w.min(), zero_t), torch.maximum(w.max(), zero_t)
            if sym:
                hi = torch.maximum(lo.abs(), hi)
                lo = -hi if lo < 0 else lo
            scale = (hi - lo) / top
            zero = (top + 1) / 2 if sym else torch.round(-lo / scale)
            q = torch.clamp(torch.round(w / scale) + zero, 0, top)
            Q[r, g : g + gs] = (scale * (q - zero)).double()
    return Q


@pytest.mark.parametrize("layer", ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"])
def test_predicted_loss_equals_an_independent_computation(layer, model_dir):
    folder = model_dir("llama")
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(5))
    options = [QuantSpec(3, 32, True), QuantSpec(4, -1, False), QuantSpec(2, 64, False), None]
    sm = load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu")).streamed()
    losses, energy, block_kl, _ = measure(sm, ids, {layer: options})
    got = losses[layer]

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    mod = model.get_submodule(layer)
    xs = []
    handle = mod.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for w in range(ids.shape[0]):
            model(ids[w : w + 1], use_cache=False)
    handle.remove()
    X = torch.cat(xs).double()  # [tokens, in]
    W = mod.weight.detach().double()
    for spec, loss in zip(options, got):
        if spec is None:
            assert loss == 0.0
            continue
        D = W - slow_rtn(W, spec.bits, spec.group_size, spec.sym)
        want = 2.0 / X.shape[0] * float(((X @ D.t()) ** 2).sum())
        assert want > 0 and loss == pytest.approx(want, rel=1e-4)
    assert got[2] > got[0] > got[1]  # 2-bit worse than 3-bit worse than 4-bit
    assert block_kl is None  # no reference options: no block KL walk
    assert energy[layer] == pytest.approx(2.0 / X.shape[0] * float(((X @ W.t()) ** 2).sum()), rel=1e-4)
