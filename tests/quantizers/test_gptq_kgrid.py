"""GPTQ and RTN on GGUF's block grids: codes on the grid, GPTQ's layer error below RTN's."""
import pytest
import torch

from compress.formats.qweight import BlockQuantWeight
from compress.quantizers import kgrid
from compress.quantizers.base import QuantSpec
from compress.quantizers.gptq import GPTQSpec, gptq
from compress.quantizers.hessian import output_error
from compress.quantizers.rtn import round_to_nearest


def _problem(out_f=48, in_f=512, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    # correlated inputs with uneven channel scales, as a transformer's are
    X = torch.randn(n, in_f // 8, generator=g) @ torch.randn(in_f // 8, in_f, generator=g)
    X = X + 0.3 * torch.randn(n, in_f, generator=g)
    X = X * torch.logspace(-1, 0.5, in_f)[torch.randperm(in_f, generator=g)]
    H = 2.0 / n * X.t() @ X
    return W, H


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_below_rtn_on_the_same_grid(name, desc_act):
    W, H = _problem()
    spec = GPTQSpec(bits=4).on_gguf_grid(name)
    spec = GPTQSpec(**{**spec.__dict__, "desc_act": desc_act, "static_groups": True, "damp_percent": 0.01})
    res = gptq(W, H, spec)
    rtn = round_to_nearest(W, QuantSpec(bits=4).on_gguf_grid(name))
    assert isinstance(res.weight, BlockQuantWeight) and res.weight.grid_name == name
    e_g = output_error(W, res.weight.dequantize(), H)
    e_r = output_error(W, rtn.dequantize(), H)
    assert e_g < 0.9 * e_r, (e_g, e_r)
    # the codes are the grid's, on GPTQ's own fitted sub-block scales
    g = kgrid.get_grid(name)
    assert int(res.weight.codes.max()) < len(g.levels)
    assert res.weight.codes.shape == W.shape and res.weight.d.dtype == torch.float16


def test_spec_on_grid_takes_the_grids_bits():
    s = GPTQSpec(bits=4, group_size=128, sym=True, damp_percent=0.02).on_gguf_grid("Q6_K")
    assert (s.bits, s.group_size, s.sym, s.gguf_grid, s.damp_percent) == (6, 16, True, "Q6_K", 0.02)
    assert s.grid.gguf_grid == "Q6_K"
