import numpy as np
import pytest
import torch

from compress.quantizers import get_method
from compress.quantizers.base import NO_STATS, QuantSpec
from compress.quantizers.rtn import RTNConfig, quantize_weight, round_to_nearest


def slow_rtn(W, bits, group_size, sym):
    """Per element, in float32 scalars (RTN's working precision), GPTQ-reference conventions."""
    f = np.float32
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    maxq = 2**bits - 1
    codes = [[0] * in_f for _ in range(out_f)]
    scales = [[0.0] * (in_f // gs) for _ in range(out_f)]
    zeros = [[0] * (in_f // gs) for _ in range(out_f)]
    for r in range(out_f):
        for g in range(in_f // gs):
            vals = [f(v) for v in W[r, g * gs : (g + 1) * gs].float().numpy()]
            lo, hi = min(min(vals), f(0)), max(max(vals), f(0))
            if sym:
                hi = max(-lo, hi)
                lo = -hi if lo < 0 else lo
            if lo == 0 and hi == 0:
                lo, hi = f(-1), f(1)
            scale = (hi - lo) / f(maxq)
            zero = f((maxq + 1) // 2) if sym else np.round(-lo / scale)
            if not sym and zero < 1:  # asymmetric zero points start at 1: 0.0 on code 1
                scale, zero = hi / f(maxq - 1), f(1)
            scales[r][g], zeros[r][g] = float(scale), int(zero)
            for k, v in enumerate(vals):
                codes[r][g * gs + k] = int(min(max(np.round(v / scale) + zero, 0), maxq))
    return torch.tensor(codes), torch.tensor(scales, dtype=torch.float64), torch.tensor(zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 64])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_matches_per_element_reference(bits, group_size, sym):
    g = torch.Generator().manual_seed(bits * 7 + group_size)
    W = torch.randn(6, 128, generator=g, dtype=torch.float64)
    W[0, :64] = W[0, :64].abs()  # a group with no negative value
    W[1, :] = 0.0  # an all-zero row
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
    qw = round_to_nearest(W, spec)
    codes, scales, zeros = slow_rtn(W, bits, group_size, sym)
    assert qw.codes.dtype == torch.uint8
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= 2**bits - 1
    assert torch.equal(qw.codes.long(), codes)
    assert sym or int(qw.zeros.min()) >= 1  # GPTQ v1 stores zero - 1: a 0 would wrap
    assert torch.equal(qw.zeros.long(), zeros)
    torch.testing.assert_close(qw.scales.double(), scales, rtol=1e-6, atol=0)
    gs = 128 if group_size == -1 else group_size
    assert torch.equal(qw.g_idx.long(), torch.arange(128) // gs)
    if not sym:  # the asymmetric grid spans [min, max]: nothing is clamped by more than half a step
        step = qw.scales[:, qw.g_idx.long()].double()
        assert ((qw.dequantize(torch.float64) - W).abs() <= step / 2 + 1e-6).all()


def test_rtn_registered_without_statistics():
    m = get_method("rtn")
    assert m.quantize is quantize_weight and m.stats == "none" and not m.needs_calibration
    assert m.config is RTNConfig and "damp_percent" not in RTNConfig.model_fields  # no GPTQ options
    W = torch.randn(8, 64)
    res = quantize_weight(W, NO_STATS, QuantSpec(bits=4, group_size=32, sym=False))
    assert res.spec == QuantSpec(4, 32, False)
    assert torch.equal(res.weight.codes, round_to_nearest(W, res.spec).codes)
