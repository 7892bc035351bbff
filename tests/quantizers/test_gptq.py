import logging

import pytest
import torch

from compress.quantizers import get_method
from compress.quantizers.base import LayerStats, NumericalError
from compress.quantizers.gptq import (
    GPTQConfig,
    GPTQNumericalError,
    GPTQSpec,
    clip_search_params,
    factor_hessian,
    gptq,
    gptq_factored,
    quantize_weight,
)
from compress.quantizers.grid import find_params
from compress.quantizers.hessian import HessianAccumulator, output_error, relative_output_error
from compress.quantizers.rtn import round_to_nearest


def reference_gptq(W, H, spec):
    """Algorithm 1 one column at a time, in float64, with the explicit OBS inverse downdate
    (Frantar et al., Eq. 3 and the row removal of H^-1) instead of a Cholesky factor, no
    blocks and no lazy updates. Returns codes, scales, zeros (original column order), g_idx."""
    W = W.double().clone()
    H = H.double().clone()
    out_f, in_f = W.shape
    gs = in_f if spec.group_size == -1 else spec.group_size
    maxq = 2**spec.bits - 1
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    def params(x, weight):
        if spec.mse_clip:
            return clip_search_params(x, spec.bits, spec.sym, weight=weight)
        return find_params(x, spec.bits, spec.sym)

    static = spec.static_groups or spec.group_size == -1
    fixed = {}
    if static:
        for g in range(in_f // gs):
            fixed[g] = params(W[:, g * gs : (g + 1) * gs], torch.diagonal(H)[g * gs : (g + 1) * gs])
    perm = torch.argsort(torch.diagonal(H), descending=True) if spec.desc_act else torch.arange(in_f)
    W, H = W[:, perm], H[perm][:, perm]
    hdiag = torch.diagonal(H).clone()
    H += spec.damp_percent * torch.diagonal(H).mean() * torch.eye(in_f, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    g_idx = torch.zeros(in_f, dtype=torch.long)
    scales = torch.zeros(out_f, in_f // gs, dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    for j in range(in_f):
        if static:
            g = int(perm[j]) // gs
            s, z = fixed[g]
        else:
            g = j // gs
            if j % gs == 0:
                current = params(W[:, j : j + gs], hdiag[j : j + gs])
            s, z = current
        scales[:, g], zeros[:, g] = s, z
        g_idx[perm[j]] = g
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, maxq)
        Q[:, j] = q
        err = (W[:, j] - s * (q - z)) / Hinv[j, j]
        W[:, j:] -= err.unsqueeze(1) * Hinv[j, j:].unsqueeze(0)
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    inv = torch.argsort(perm)
    return Q[:, inv], scales, zeros, g_idx


def random_problem(out_f, in_f, seed, dead=()):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f, generator=g, dtype=torch.float64) / in_f**0.5
    x = torch.randn(4 * in_f, in_f, generator=g, dtype=torch.float64) @ A
    x = x * torch.rand(in_f, generator=g, dtype=torch.float64) * 3  # uneven H diag for act-order
    for c in dead:
        x[:, c] = 0
    acc = HessianAccumulator(in_f, dtype=torch.float64)
    acc.add(x)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    return W, acc.hessian, x


CASES = [
    GPTQSpec(bits=4, group_size=16, sym=True),
    GPTQSpec(bits=4, group_size=16, sym=False),
    GPTQSpec(bits=3, group_size=-1, sym=False),
    GPTQSpec(bits=2, group_size=32, sym=False),
    GPTQSpec(bits=4, group_size=160, sym=False),  # one group that straddles two blocks
    GPTQSpec(bits=8, group_size=-1, sym=True),
    GPTQSpec(bits=4, group_size=16, sym=False, desc_act=True),
    GPTQSpec(bits=3, group_size=16, sym=True, desc_act=True, static_groups=True),
    GPTQSpec(bits=4, group_size=16, sym=False, static_groups=True),
    GPTQSpec(bits=4, group_size=16, sym=False, mse_clip=True),
    GPTQSpec(bits=3, group_size=-1, sym=True, desc_act=True, mse_clip=True),
    # groups straddle blocks and blocks hold several groups
    GPTQSpec(bits=4, group_size=32, sym=False, block_size=24),
    GPTQSpec(bits=4, group_size=8, sym=False, block_size=20, desc_act=True),
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: repr(s)[9:-1])
def test_matches_column_by_column_reference(spec):
    W, H, _ = random_problem(12, 160, seed=spec.bits + spec.group_size)  # 160: a partial block
    codes, scales, zeros, g_idx = reference_gptq(W, H, spec)
    qw = gptq(W, H, spec).weight
    assert torch.equal(qw.codes.long(), codes.long())
    assert torch.equal(qw.g_idx.long(), g_idx)
    torch.testing.assert_close(qw.scales.double(), scales, rtol=1e-6, atol=0)
    assert torch.equal(qw.zeros.double(), zeros)
    assert qw.codes.max() <= 2**spec.bits - 1
    assert qw.desc_act == (spec.desc_act and not spec.static_groups and spec.group_size != -1)


def test_float32_path_close_to_float64():
    W, H, _ = random_problem(16, 64, seed=5)
    spec = GPTQSpec(bits=4, group_size=16, sym=False)
    e64 = output_error(W, gptq(W, H, spec).weight.dequantize(torch.float64), H)
    e32 = output_error(W.float(), gptq(W.float(), H.float(), spec).weight.dequantize(), H.float())
    assert e32 == pytest.approx(e64, rel=0.05)


def test_act_order_g_idx_is_processing_order_group():
    W, H, _ = random_problem(8, 64, seed=6)
    qw = gptq(W, H, GPTQSpec(bits=4, group_size=16, sym=False, desc_act=True)).weight
    perm = torch.argsort(torch.diagonal(H), descending=True)
    assert torch.equal(qw.g_idx[perm].long(), torch.arange(64) // 16)
    assert not torch.equal(qw.g_idx.long(), torch.arange(64) // 16)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [32, -1])
def test_layer_output_error_below_rtn_on_correlated_inputs(bits, group_size):
    g = torch.Generator().manual_seed(bits)
    in_f, out_f = 128, 64
    A = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(2048, in_f, generator=g) @ A  # x = z A: strongly correlated features
    W = torch.randn(out_f, in_f, generator=g)
    acc = HessianAccumulator(in_f)
    acc.add(x)
    spec = GPTQSpec(bits=bits, group_size=group_size, sym=False)
    res = gptq(W, acc.hessian, spec)
    err_rtn = ((x @ (W - round_to_nearest(W, spec).dequantize()).t()) ** 2).mean()
    err_gptq = ((x @ (W - res.weight.dequantize()).t()) ** 2).mean()
    assert err_gptq < 0.7 * err_rtn
    Wq = res.weight.dequantize()
    assert output_error(W, Wq, acc.hessian) == pytest.approx(2 * out_f * float(err_gptq), rel=1e-3)
    # relative: the mean squared output error over the mean squared output
    energy = float(((x @ W.t()) ** 2).mean())
    assert relative_output_error(W, Wq, acc.hessian) == pytest.approx(float(err_gptq) / energy, rel=1e-3)


def test_dead_columns_are_zero_and_finite():
    W, H, _ = random_problem(8, 32, seed=7, dead=(3, 17))
    res = gptq(W, H, GPTQSpec(bits=4, group_size=16, sym=False))
    Wq = res.weight.dequantize()
    assert torch.isfinite(Wq).all()
    assert torch.equal(Wq[:, [3, 17]], torch.zeros(8, 2))
    assert res.damp_percent == 0.01


def _indefinite_hessian(n, neg):
    g = torch.Generator().manual_seed(8)
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.full((n,), 10.0, dtype=torch.float64)
    eig[-1] = neg
    return (Qm * eig) @ Qm.t()


def test_cholesky_failure_retries_with_more_damping(caplog):
    H = _indefinite_hessian(32, -0.5)  # needs damping > 0.5 / ~10: fails at 1 %, passes at 10 %
    W = torch.randn(4, 32, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="compress.quantizers.gptq"):
        res = gptq(W, H, GPTQSpec(bits=4, group_size=16))
    assert res.damp_percent == pytest.approx(0.1)
    assert any("damp_percent=0.01" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(res.weight.dequantize()).all()


def test_cholesky_failure_raises_after_retries():
    H = -torch.eye(16, dtype=torch.float64)  # negative definite: no damping fraction helps
    with pytest.raises(GPTQNumericalError, match="quantize.damp_percent") as info:
        gptq(torch.randn(4, 16, dtype=torch.float64), H, GPTQSpec(bits=4, group_size=16))
    assert len(info.value.damp_percents) == 4


@pytest.mark.parametrize("bad", ["W", "H"])
def test_nan_or_inf_is_rejected(bad):
    W, H, _ = random_problem(4, 16, seed=9)
    if bad == "W":
        W[1, 2] = float("nan")
    else:
        H[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq(W, H, GPTQSpec(bits=4, group_size=16))


def test_registered_with_its_config_and_hessian():
    m = get_method("gptq")
    assert m.stats == "hessian" and m.quantize is quantize_weight and m.config is GPTQConfig
    assert issubclass(GPTQNumericalError, NumericalError)  # the engine falls back to RTN on it
    with pytest.raises(ValueError, match="Hessian"):
        quantize_weight(torch.randn(4, 16), LayerStats(), GPTQSpec(bits=4, group_size=16))


def test_contract_returns_the_spec_it_used():
    W, H, _ = random_problem(4, 32, seed=11)
    spec = GPTQSpec(bits=4, group_size=16, sym=False, damp_percent=0.02)
    res = quantize_weight(W, LayerStats(hessian=H), spec)
    assert res.spec == spec and torch.equal(res.weight.codes, gptq(W, H, spec).weight.codes)
    res = quantize_weight(torch.randn(4, 32, dtype=torch.float64), LayerStats(hessian=_indefinite_hessian(32, -0.5)),
                          GPTQSpec(bits=4, group_size=16))
    assert res.spec.damp_percent == pytest.approx(0.1)  # what the retries settled on


def test_config_builds_the_layer_spec():
    q = GPTQConfig(bits=3, group_size=64, damp_percent=0.02, desc_act=True, static_groups=False)
    spec = q.spec(8, -1, False)
    assert (spec.bits, spec.group_size, spec.sym, spec.damp_percent, spec.desc_act) == (8, -1, False, 0.02, True)
    assert spec.grid == type(spec).__mro__[1](8, -1, False)
    assert not spec.permutes_columns  # per-channel: one group, nothing to permute
    assert q.spec(4, 64, True).permutes_columns and q.name_parts() == ["act"]


def test_clip_search_matches_brute_force():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(6, 32, generator=g)
    x[0, 0] = 6.0  # an outlier that clipping should cut
    wgt = torch.rand(32, generator=g)
    for sym in (True, False):
        s, z = clip_search_params(x, 3, sym, weight=wgt, shrinks=(1.0, 0.9, 0.8))
        for r in range(6):
            best = None
            for p in (1.0, 0.9, 0.8):
                sp, zp = find_params(x[r : r + 1], 3, sym, shrink=p)
                q = torch.clamp(torch.round(x[r] / sp) + zp, 0, 7)
                e = float((wgt * (sp * (q - zp) - x[r]) ** 2).sum())
                if best is None or e < best[0]:
                    best = (e, sp, zp)
            assert float(s[r]) == pytest.approx(float(best[1]))
            assert float(z[r]) == float(best[2])
    s_plain, _ = find_params(x[:1], 3, False)
    s_clip, _ = clip_search_params(x[:1], 3, False)
    assert float(s_clip[0]) < float(s_plain[0])


FACTORED = [
    GPTQSpec(bits=4, group_size=16, sym=False),
    GPTQSpec(bits=4, group_size=16, sym=False, desc_act=True),  # dynamic groups, permuted g_idx
    GPTQSpec(bits=4, group_size=16, sym=True, desc_act=True, static_groups=True, mse_clip=True),
    GPTQSpec(bits=4, group_size=-1, sym=False, desc_act=True, block_size=24),
]


@pytest.mark.parametrize("spec", FACTORED, ids=lambda s: repr(s)[9:-1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_factor_rounds_several_weights_as_gptq_does(spec, dtype):
    """A factor reused weight after weight gives each one `gptq`'s result bit for bit: rounding
    leaves the factor as it found it (dead columns included)."""
    _, H, _ = random_problem(8, 64, seed=12, dead=(5,))
    H = H.to(dtype)
    factor = factor_hessian(H, spec, dtype)
    before = factor.hinv.clone(), factor.hdiag.clone()
    for seed in range(3):
        W = torch.randn(8 + 3 * seed, 64, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        got, want = gptq_factored(W, factor, spec), gptq(W, H, spec)
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(got.weight, field), getattr(want.weight, field)), field
        assert (got.loss, got.damp_percent) == (want.loss, want.damp_percent)
    assert torch.equal(factor.hinv, before[0]) and torch.equal(factor.hdiag, before[1])


def test_a_factor_keeps_the_damping_its_retries_settled_on():
    H = _indefinite_hessian(32, -0.5)
    factor = factor_hessian(H, GPTQSpec(bits=4, group_size=16), torch.float64)
    assert factor.damp_percent == pytest.approx(0.1)
    assert gptq_factored(torch.randn(4, 32, dtype=torch.float64), factor, GPTQSpec(bits=4, group_size=16)).damp_percent \
        == factor.damp_percent


def test_a_factor_made_for_another_order_shape_or_dtype_is_refused():
    _, H, _ = random_problem(4, 32, seed=13)
    factor = factor_hessian(H, GPTQSpec(bits=4, group_size=16, desc_act=True), torch.float64)
    W = torch.randn(4, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="desc_act=True"):
        gptq_factored(W, factor, GPTQSpec(bits=4, group_size=16))
    with pytest.raises(ValueError, match="do not match"):
        gptq_factored(W[:, :16], factor, GPTQSpec(bits=4, group_size=16, desc_act=True))
    with pytest.raises(ValueError, match="float64"):
        gptq_factored(W.float(), factor, GPTQSpec(bits=4, group_size=16, desc_act=True))
