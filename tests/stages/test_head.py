"""`compress.stages.head`: the lm_head rounded by GPTQ against the Hessian of what it receives.

Invariants: GPTQ's Hessian-weighted output error is below round-to-nearest's on the same
weights; rounding the head in row slices gives exactly the codes of one call on the whole
matrix (GPTQ's rows are independent given H), and factorising H once for all slices gives the
codes of factorising it per slice (the path before); the head Hessian equals ``2/n X^T X`` of the
final norm's output computed by transformers' own forward (an independent path)."""
from __future__ import annotations

import torch

from compress.quantizers.base import QuantSpec
from compress.quantizers.gptq import GPTQConfig, GPTQSpec, gptq
from compress.quantizers.hessian import HessianAccumulator, output_error
from compress.quantizers.rtn import RTNConfig
from compress.stages.head import head_gptq_spec, head_hessian, round_head

GRID = QuantSpec(bits=4, group_size=32, sym=False)
SPEC = GPTQSpec(4, 32, False, damp_percent=0.05, desc_act=True, static_groups=True, mse_clip=True)


def correlated(rows: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A head-shaped weight [rows, in_f] and the Hessian of correlated inputs with a few large
    channels (as a final norm's output has)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(4096, in_f, generator=g) @ A
    x[:, :4] *= 8
    acc = HessianAccumulator(in_f)
    acc.add(x)
    return torch.randn(rows, in_f, generator=g) * 0.05, acc.hessian


def test_gptq_head_has_a_lower_output_error_than_rtn():
    W, H = correlated(300, 64, seed=0)
    slices = lambda: (W[s : s + 128] for s in range(0, 300, 128))  # noqa: E731
    g = round_head(slices(), GRID, "lm_head", H, SPEC)
    r = round_head(slices(), GRID, "lm_head")
    assert (g.method, r.method) == ("gptq", "rtn") and r.output_rel_error is None
    e_g = output_error(W, g.weight.dequantize(torch.float32), H)
    e_r = output_error(W, r.weight.dequantize(torch.float32), H)
    assert e_g < 0.7 * e_r
    # the reported error is this one, relative to the output's energy
    torch.testing.assert_close(g.output_rel_error, e_g / output_error(W, torch.zeros_like(W), H), rtol=1e-5, atol=0)


def test_slices_give_the_codes_of_the_whole_matrix():
    W, H = correlated(300, 64, seed=1)
    whole = gptq(W, H, SPEC).weight
    got = round_head((W[s : s + 77] for s in range(0, 300, 77)), GRID, "lm_head", H, SPEC).weight
    assert torch.equal(got.codes, whole.codes) and torch.equal(got.zeros, whole.zeros)
    torch.testing.assert_close(got.scales, whole.scales, rtol=0, atol=0)
    assert torch.equal(got.g_idx, torch.arange(64, dtype=torch.int32) // 32)  # static groups: in order


def _per_slice(slices, H, spec):
    """The path before one factorisation per head: `gptq` (damping, Cholesky, inverse) per slice."""
    from compress.formats.qweight import QuantizedWeight

    res = [gptq(w.float(), H, spec) for w in slices]
    return QuantizedWeight.cat_rows([r.weight for r in res]), {r.damp_percent for r in res}


def _assert_same(a, b):
    for field in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_a_tiny_models_head_is_the_per_slice_path_bit_for_bit(tmp_path):
    """A random Llama's head against the Hessian of its own final norm output, in slices of 100
    of its 512 rows (the last one short), as `Exporter.write_head` reads them."""
    from compress.engine import StreamedModel
    from compress.models.checkpoint import open_checkpoint
    from tiny_models import VOCAB, make_model, save_model

    model = make_model("llama", seed=4)
    src = save_model(model, tmp_path / "src")
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    sm = StreamedModel(model.config, open_checkpoint(src), torch.device("cpu"), torch.float32, batch_size=2)
    stream = sm.embed(ids)
    sm.walk(stream, lambda i, block, s: sm.run_block(block, i, s), "test")
    sm.release_outer(keep_head_path=True)
    H = head_hessian(sm, stream, ids)
    W = model.lm_head.weight.detach()
    slices = lambda: [W[s : s + 100] for s in range(0, VOCAB, 100)]  # noqa: E731
    got = round_head(slices(), GRID, "lm_head", H, SPEC)
    want, damps = _per_slice(slices(), H, SPEC)
    assert got.method == "gptq" and damps == {got.damp_percent}
    _assert_same(got.weight, want)


def test_damping_retries_are_made_once_per_head(caplog):
    """An indefinite H that factorises only at 10x the damping: one retry for the whole head
    (the path before retried per slice), the same codes, and the damping used reported."""
    W, _ = correlated(96, 32, seed=5)
    g = torch.Generator().manual_seed(6)
    Qm, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    eig = torch.full((32,), 10.0)
    eig[-1] = -0.5  # needs damping > 0.5 / ~10: fails at 1 %, passes at 10 %
    H = (Qm * eig) @ Qm.t()
    spec = GPTQSpec(4, 32, False, damp_percent=0.01, desc_act=True, static_groups=True)
    slices = lambda: [W[s : s + 32] for s in range(0, 96, 32)]  # noqa: E731
    with caplog.at_level("WARNING", logger="compress.quantizers.gptq"):
        got = round_head(slices(), GRID, "lm_head", H, spec)
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 1
    assert got.method == "gptq" and abs(got.damp_percent - 0.1) < 1e-12
    want, damps = _per_slice(slices(), H, spec)
    assert damps == {got.damp_percent}
    _assert_same(got.weight, want)


def test_a_failed_cholesky_falls_back_to_rtn_for_the_whole_head(caplog):
    W, _ = correlated(64, 64, seed=2)
    H = -torch.eye(64)  # negative definite: no damping makes it factorise
    got = round_head((W[s : s + 16] for s in range(0, 64, 16)), GRID, "lm_head", H, SPEC)
    assert got.method == "rtn-fallback" and got.damp_percent is None
    assert "quantize.lm_head.rounding: rtn" in caplog.text
    assert torch.equal(got.weight.codes, round_head([W], GRID, "lm_head").weight.codes)


def test_spec_takes_the_plans_gptq_options_and_static_groups():
    q = GPTQConfig(damp_percent=0.1, desc_act=False, static_groups=False, mse_clip=False, block_size=64)
    s = head_gptq_spec(q, GRID)
    assert (s.damp_percent, s.desc_act, s.mse_clip, s.block_size, s.static_groups) == (0.1, False, False, 64, True)
    assert not s.permutes_columns
    from compress.quantizers.awq import AWQConfig

    a = head_gptq_spec(AWQConfig(damp_percent=0.02), GRID)  # GPTQ's defaults beside the plan's damping
    d = GPTQConfig()
    assert (a.damp_percent, a.desc_act, a.mse_clip) == (0.02, d.desc_act, d.mse_clip)
    assert head_gptq_spec(RTNConfig(), GRID).damp_percent == d.damp_percent


def test_head_hessian_is_that_of_transformers_final_norm_output(tmp_path):
    from compress.models.checkpoint import open_checkpoint
    from compress.engine import StreamedModel
    from tiny_models import VOCAB, make_model, save_model

    model = make_model("llama", seed=3, tie_word_embeddings=True)
    src = save_model(model, tmp_path / "src")
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    sm = StreamedModel(model.config, open_checkpoint(src), torch.device("cpu"), torch.float32, batch_size=2)
    stream = sm.embed(ids)
    sm.walk(stream, lambda i, block, s: sm.run_block(block, i, s), "test")
    sm.release_outer(keep_head_path=True)  # as the quantize walk leaves it
    got = head_hessian(sm, stream, ids, torch.float64)
    with torch.no_grad():
        x = model.model(ids).last_hidden_state.reshape(-1, model.config.hidden_size).double()
    torch.testing.assert_close(got, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
