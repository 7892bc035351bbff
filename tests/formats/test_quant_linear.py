"""QuantLinear: same outputs as the dequantized float layer, compact storage, state round trip."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.formats import gptq
from compress.formats.quant_linear import QuantLinear, dequantized_linear
from compress.quantizers.base import QuantSpec
from compress.quantizers.rtn import round_to_nearest as quantize_weight


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64), (2, -1), (8, 128)])
def test_forward_matches_dequantized_linear(bits: int, group_size: int) -> None:
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 256, generator=g)
    b = torch.randn(64, generator=g)
    qw = quantize_weight(W, QuantSpec(bits=bits, group_size=group_size))
    ql = QuantLinear(qw, b)
    ref = dequantized_linear(qw, b)
    x = torch.randn(2, 5, 256, generator=g)
    # Reference: explicit formula, written out independently of both modules.
    Wd = qw.scales[:, qw.g_idx.long()] * (qw.codes.float() - qw.zeros.float()[:, qw.g_idx.long()])
    expect = x @ Wd.t() + b
    torch.testing.assert_close(ql(x), expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref(x), expect, rtol=1e-5, atol=1e-5)
    assert (ql.in_features, ql.out_features) == (256, 64)
    assert isinstance(ref, nn.Linear) and ref.weight.shape == (64, 256)


def test_holds_no_float_weight_and_round_trips_state() -> None:
    qw = quantize_weight(torch.randn(64, 256), QuantSpec(bits=4, group_size=128))
    ql = QuantLinear(qw)
    names = dict(ql.named_buffers())
    assert set(names) == {"qweight", "zeros", "scales", "g_idx"}
    assert names["qweight"].dtype == torch.int32 and names["qweight"].numel() == 64 * 256 // 8
    assert not list(ql.parameters())
    back = ql.quantized_weight()
    assert torch.equal(back.codes, qw.codes)
    ql2 = QuantLinear(qw)
    ql2.load_state_dict(ql.state_dict())
    x = torch.randn(3, 256)
    assert torch.equal(ql(x), ql2(x))


def test_from_gptq_tensors_uses_fp16_scales() -> None:
    qw = quantize_weight(torch.randn(32, 128), QuantSpec(bits=4, group_size=64))
    t = gptq.linear_tensors("p", qw, torch.randn(32))
    ql = QuantLinear.from_gptq_tensors(t, "p", 4, 64, True)
    assert torch.equal(ql.scales, qw.scales.half().float())
    x = torch.randn(4, 128, dtype=torch.float64)
    Wd = ql.quantized_weight().dequantize(torch.float64)
    torch.testing.assert_close(ql(x), x @ Wd.t() + t["p.bias"].double())
