"""The CPU kernels behind the fast path: which layers each one takes, and their numbers against
an independent float64 model of what the kernel computes (bfloat16 activations and scales)."""
from __future__ import annotations

import pytest
import torch

from compress.formats.qweight import QuantizedWeight
from compress.formats.quant_linear import QuantLinear
from compress.quantizers.base import QuantSpec
from compress.quantizers.rtn import round_to_nearest
from compress.runtime import kernels
from compress.runtime.kernels import DENSE, INT4, INT8, choose

CPU = torch.device("cpu")


def _bf(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def _expect_int4(qw: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    """x @ W.T with W = (q - 8) * bf16(s) + bf16(s * (8 - z)) and bf16(x): the kernel's own
    convention, written per input column from g_idx (no packing, no group reshapes)."""
    g = qw.g_idx.long()
    s = qw.scales.double()[:, g]
    zf = (qw.scales.double() * (8 - qw.zeros.double()))[:, g]
    w = (qw.codes.double() - 8) * _bf(s) + _bf(zf)
    return _bf(x) @ w.t()


def _reference(qw: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    g = qw.g_idx.long()
    return x.double() @ (qw.scales.double()[:, g] * (qw.codes.double() - qw.zeros.double()[:, g])).t()


def _close_bf16(y: torch.Tensor, expect: torch.Tensor, x: torch.Tensor, w_abs: torch.Tensor) -> None:
    # One bfloat16 rounding of the output (and of fp32 partial sums) at most: 2^-8 of the
    # magnitude |x| @ |W|.T that the dot product runs through.
    bound = 2.0 ** -8 * (x.abs().double() @ w_abs.t()) + 1e-6
    err = (y.double() - expect).abs()
    assert bool((err <= bound).all()), f"max err {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


def _w_abs(qw: QuantizedWeight) -> torch.Tensor:
    return qw.dequantize(torch.float64).abs()


@pytest.mark.parametrize("bits,group_size,sym", [(4, 64, True), (4, 64, False), (4, -1, True), (3, 32, False),
                                                 (2, 128, True), (4, 512, False)])
def test_int4pack_follows_the_zero_point_convention(bits, group_size, sym) -> None:
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    W = torch.randn(48, 1024, generator=g)
    qw = round_to_nearest(W, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    assert choose(qw, CPU).name == INT4
    mod = kernels.Int4PackLinear(qw, None, None)
    x = torch.randn(3, 5, 1024, generator=g)
    y = mod(x)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    x2 = x.reshape(-1, 1024)
    _close_bf16(y.reshape(-1, 48), _expect_int4(qw, x2), x2, _w_abs(qw))
    # and against the exact dequantized reference, within bf16's rounding of x and scales
    bound = 2.0 ** -6 * (x2.abs().double() @ _w_abs(qw).t()) + 1e-5
    assert bool(((y.reshape(-1, 48).double() - _reference(qw, x2)).abs() <= bound).all())


def _act_order(out_f: int, in_f: int, gs: int, bits: int, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(in_f, generator=g)
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_f) // gs).to(torch.int32)  # GPTQ act-order: groups follow the permutation
    n_g = in_f // gs
    return QuantizedWeight(
        codes=torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.uint8),
        scales=torch.rand(out_f, n_g, generator=g) + 0.05,
        zeros=torch.randint(1, 1 << bits, (out_f, n_g), generator=g, dtype=torch.uint8),
        g_idx=g_idx, bits=bits, group_size=gs, sym=False, desc_act=True,
    )


def test_act_order_layer_runs_with_permuted_columns() -> None:
    qw = _act_order(32, 256, 64, 4, 1)
    assert choose(qw, CPU).name == INT4
    mod = kernels.Int4PackLinear(qw, torch.randn(32), None)
    assert mod.perm is not None
    x = torch.randn(7, 256)
    _close_bf16(mod(x) - mod.bias, _expect_int4(qw, x), x, _w_abs(qw))


def test_unequal_act_order_groups_fall_back_to_dense() -> None:
    qw = _act_order(32, 256, 64, 4, 2)
    g_idx = qw.g_idx.clone()
    g_idx[g_idx == 0] = 1  # group 1 now holds 128 columns, group 0 none
    qw = QuantizedWeight(qw.codes, qw.scales, qw.zeros, g_idx, 4, 64, False, True)
    assert "unequal" in kernels._int4_why_not(qw, CPU)
    assert choose(qw, CPU).name == DENSE
    x = torch.randn(3, 256)
    torch.testing.assert_close(choose(qw, CPU).build(qw, None, None)(x), QuantLinear(qw)(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sym", [True, False])
def test_int8pack_per_channel(sym: bool) -> None:
    g = torch.Generator().manual_seed(8)
    W = torch.randn(40, 320, generator=g) + (0.0 if sym else 0.7)
    qw = round_to_nearest(W, QuantSpec(bits=8, group_size=-1, sym=sym))
    assert choose(qw, CPU).name == INT8
    mod = kernels.Int8PackLinear(qw, None, None)
    assert (mod.correction is None) == sym
    x = torch.randn(6, 320, generator=g)
    # The kernel's model: bf16(x) @ (bf16(s) * (q - 128)).T, plus the zero's correction in fp32.
    q8 = qw.codes.double() - 128
    s = qw.scales.double()[:, 0]
    expect = _bf(x) @ (q8 * _bf(s)[:, None]).t() + x.double().sum(-1, keepdim=True) * (s * (128 - qw.zeros.double()[:, 0]))
    _close_bf16(mod(x), expect, x, _w_abs(qw))


@pytest.mark.parametrize("why,qw", [
    ("8-bit with groups", round_to_nearest(torch.randn(32, 256), QuantSpec(bits=8, group_size=64))),
    ("multiple of 16", round_to_nearest(torch.randn(24, 256), QuantSpec(bits=4, group_size=64))),
    ("no multiple", round_to_nearest(torch.randn(32, 240), QuantSpec(bits=4, group_size=48))),
])
def test_layers_no_kernel_holds_use_the_dequantized_weight(why, qw) -> None:
    assert choose(qw, CPU).name == DENSE
    reasons = [k.why_not(qw, CPU) for k in kernels.KERNELS[:-1]]
    assert any(why in (r or "") for r in reasons), reasons


def test_accelerate_swaps_quant_linears_and_names_the_kernels() -> None:
    model = torch.nn.Sequential(
        QuantLinear(round_to_nearest(torch.randn(32, 128), QuantSpec(bits=4, group_size=64))),
        QuantLinear(round_to_nearest(torch.randn(32, 32), QuantSpec(bits=8, group_size=-1))),
        QuantLinear(round_to_nearest(torch.randn(32, 32), QuantSpec(bits=8, group_size=16))),
    )
    used = kernels.accelerate(model, CPU)
    assert used == {"0": INT4, "1": INT8, "2": DENSE}
    assert isinstance(model[0], kernels.Int4PackLinear) and isinstance(model[1], kernels.Int8PackLinear)
    assert kernels.summary(used, "torch fp32") == f"{INT4} x1 + {INT8} x1 + {DENSE} x1"
    assert kernels.summary({}, "torch fp32") == "torch fp32"
