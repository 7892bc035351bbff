"""The quantize stage's Hessian collection: layers fed one tensor share one Hessian, equal to
the Hessian each would accumulate alone (checked against hooks written here)."""
from __future__ import annotations

import pytest
import torch

from compress.config import ModelConfig
from compress.stages.load import load_model
from compress.stages.passes import block_forward, collect_stats
from tiny_models import VOCAB


def reference_hessians(block, sm, i, names, hidden):
    xs = {n: [] for n in names}
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: xs[n].append(a[0].detach().clone()))
             for n in names]
    try:
        for s in range(0, len(hidden), sm.batch_size):
            sm.block_output(block, i, hidden.read(s, s + sm.batch_size))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, parts in xs.items():
        x = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts]).double()
        out[n] = (2.0 / x.shape[0]) * x.t() @ x
    return out


@pytest.mark.parametrize("family,names", [
    ("llama", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("llama", ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
    ("opt", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]),
])
def test_shared_inputs_share_one_hessian_equal_to_their_own(family, names, model_dir):
    sm = load_model(ModelConfig(source=str(model_dir(family)), dtype="float32", device="cpu")).streamed()
    ids = torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(3))
    hidden = sm.embed(ids)
    block = sm.load_block(1)
    ref = reference_hessians(block, sm, 1, names, hidden)
    got = collect_stats(sm, block, names, hidden, torch.float32, False, block_forward(sm, block, 1))
    for n in names:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-5, atol=1e-5)
    first, *rest = [n for n in names if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))]
    assert all(got[n] is got[first] for n in rest)  # computed once
