"""AWQ: scale folding is exact for every family's mappings, the search beats RTN where
activations have outlier channels, the numerical guards fire, and the method runs end to end
through the config, sweeps and the pipeline into files our loader reads back."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from compress.config import ModelConfig, parse_config
from compress.models.arch import ARCHS
from compress.quantizers import get_method
from compress.quantizers.awq import (
    AWQConfig, AWQSpec, apply_awq, best_ratio, candidate_scales, clip_params, fake_quantize, quantize_weight,
)
from compress.quantizers.folding import fold_scales
from compress.quantizers.base import BlockView, LayerStats, QuantSpec
from compress.quantizers.rtn import RTNConfig
from compress.stages.load import load_model
from compress.stages.quantize import Plan, quantize_model
from tiny_models import FAMILIES, HEADS, VOCAB, make_model, run_config, save_model

IDS = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))
LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")


def _randomise_vectors(model, seed=1):
    """Norm weights and biases away from their init (Gemma's zeros would hide a (1 + w) bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))


def _streamed(folder, **kw):
    sm = load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu", **kw)).streamed()
    return sm, sm.embed(IDS)


@pytest.fixture(scope="module")
def mha_dir(tmp_path_factory, tiny_tokenizer):
    """Tiny models with one key/value head per query head, so v_proj -> o_proj folds too."""
    made = {}

    def get(family):
        if family not in made:
            kw = {"num_key_value_heads": HEADS} if family in LLAMA_LIKE else {}
            model = make_model(family, **kw)
            _randomise_vectors(model)
            made[family] = save_model(model, tmp_path_factory.mktemp(f"mha-{family}"), tiny_tokenizer)
        return made[family]
    return get


def test_every_supported_family_has_scale_mappings():
    assert all(a.awq for a in ARCHS)


def test_a_family_without_mappings_is_a_clear_error(model_dir):
    sm, hidden = _streamed(model_dir("llama"))
    bare = dataclasses.replace(sm.arch, awq=())
    view = BlockView(0, sm.load_block(0), bare, AWQConfig(), hidden, lambda n, k: {})
    with pytest.raises(ValueError, match="no scale mappings for the 'llama' family .*ArchSpec.awq"):
        apply_awq(view)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) | {"qwen3", "gemma2"}))
def test_folding_scales_leaves_the_block_output_unchanged(family, mha_dir):
    sm, hidden = _streamed(mha_dir(family))
    x = hidden.read(0, 4)
    block = sm.load_block(0)
    ref = sm.block_output(block, 0, x)
    g = torch.Generator().manual_seed(11)
    folded = 0
    for m in sm.arch.awq:
        width = block.get_submodule(m.balance[0]).weight.shape[0 if sm.arch.conv1d else 1]
        s = torch.exp(torch.empty(width).uniform_(-1.5, 1.5, generator=g))  # s in [0.22, 4.5]
        fold_scales(block, m.smooth, m.balance, s, sm.arch.conv1d, sm.arch.norm_plus_one)
        folded += 1
    assert folded == len(sm.arch.awq) == (2 if family == "gpt2" else 4)
    got = sm.block_output(block, 0, x)
    assert not torch.equal(block.state_dict()[sm.arch.awq[0].balance[0] + ".weight"],
                           sm.load_block(0).state_dict()[sm.arch.awq[0].balance[0] + ".weight"])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_gemma_norm_fold_scales_one_plus_weight(mha_dir):
    """Folding 1/s into the weight itself (w / s) is wrong for Gemma's (1 + w) norm: the test
    above would notice, and the right fold gives (1 + w') = (1 + w) / s exactly."""
    sm, hidden = _streamed(mha_dir("gemma"))
    x = hidden.read(0, 2)
    m = sm.arch.awq[0]
    s = torch.linspace(0.5, 2.0, sm.config.hidden_size)
    naive, right = sm.load_block(0), sm.load_block(0)
    w = right.get_submodule(m.smooth).weight.detach().clone()
    fold_scales(naive, m.smooth, m.balance, s, False, norm_plus_one=False)
    fold_scales(right, m.smooth, m.balance, s, False, norm_plus_one=True)
    torch.testing.assert_close(1 + right.get_submodule(m.smooth).weight, (1 + w) / s)
    ref = sm.block_output(sm.load_block(0), 0, x)
    assert (sm.block_output(naive, 0, x) - ref).abs().max() > 1e-2
    torch.testing.assert_close(sm.block_output(right, 0, x), ref, rtol=1e-4, atol=1e-4)


def _outlier_dir(tmp_path, tokenizer):
    """A llama whose norms make 4 of 128 hidden channels 20x larger at every linear's input."""
    model = make_model("llama", num_key_value_heads=HEADS)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 40, 77, 100]] *= 20
    return save_model(model, tmp_path / "outlier", tokenizer)


def _block0_error(folder, q) -> float:
    """MSE of quantized block 0's output against the original's, on the calibration windows."""
    sm_ref, hidden = _streamed(folder)
    x = hidden.read(0, len(hidden))
    ref = sm_ref.block_output(sm_ref.load_block(0), 0, x)
    err = {}

    def sink(i, block, results):
        if i == 0:
            err["e"] = float((sm_ref.block_output(block, 0, x) - ref).pow(2).mean())

    sm = load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu")).streamed()
    quantize_model(sm, Plan("t", q), IDS, sink)
    return err["e"]


def test_awq_beats_rtn_with_outlier_input_channels(tmp_path, tiny_tokenizer):
    folder = _outlier_dir(tmp_path, tiny_tokenizer)
    rtn = _block0_error(folder, RTNConfig(bits=4, group_size=32))
    awq = _block0_error(folder, AWQConfig(bits=4, group_size=32))
    print(f"block 0 output MSE: awq {awq:.3g}, rtn {rtn:.3g}")
    assert awq < 0.7 * rtn, (awq, rtn)


def test_uniform_activations_without_duo_scaling_leave_the_block_unchanged(model_dir):
    """s = x^r: with equal magnitudes on every channel every grid point is s = 1, so the first
    (r = 0) wins and the fold changes no weight."""
    assert all(torch.equal(candidate_scales(torch.full((8,), 0.3), torch.rand(8), r / 10, duo=False),
                           torch.ones(8)) for r in range(10))
    sm, hidden = _streamed(model_dir("llama"))
    block = sm.load_block(0)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    view = BlockView(0, block, sm.arch, AWQConfig(duo_scaling=False, group_size=32), hidden,
                     lambda names, kind: {n: torch.full((block.get_submodule(n).in_features,), 0.5) for n in names},
                     forward=lambda x: sm.block_output(block, 0, x), batch_size=2)
    apply_awq(view)
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())


def test_search_keeps_the_first_of_equal_losses_and_skips_non_finite():
    assert best_ratio(torch.tensor([2.0, 1.0, 1.0])) == 1
    assert best_ratio(torch.tensor([float("nan"), float("inf"), 3.0])) == 2
    assert best_ratio(torch.tensor([float("inf"), float("nan")])) is None


def test_scales_stay_finite_and_positive_for_dead_channels():
    x = torch.tensor([0.0, 1.0, 50.0, 0.0])
    w = torch.tensor([0.5, 0.0, 0.2, 0.0])  # channel 1 and 3: an all-zero weight column
    for r in (0.0, 0.5, 0.95):
        for duo in (True, False):
            s = candidate_scales(x, w, r, duo)
            assert torch.isfinite(s).all() and (s > 0).all()


def test_fold_that_overflows_float16_names_the_layer(model_dir):
    sm = load_model(ModelConfig(source=str(model_dir("llama")), dtype="float16", device="cpu")).streamed()
    block = sm.load_block(0)
    m = sm.arch.awq[0]
    s = torch.ones(sm.config.hidden_size)
    s[5] = 1e6
    before = block.input_layernorm.weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj'.*overflow torch.float16"):
        fold_scales(block, m.smooth, m.balance, s, False, False, where="model.layers.0.")
    assert torch.equal(block.input_layernorm.weight, before)  # nothing half-written


def test_nan_activations_name_the_layer(model_dir):
    sm, hidden = _streamed(model_dir("llama"))
    block = sm.load_block(0)
    bad = torch.ones(128)
    bad[2] = float("nan")
    view = BlockView(0, block, sm.arch, AWQConfig(group_size=32), hidden, lambda names, kind: {n: bad for n in names},
                     forward=lambda x: sm.block_output(block, 0, x), batch_size=2)
    with pytest.raises(ValueError, match="layer 'model.layers.0.self_attn.q_proj': calibration inputs produced NaN"):
        apply_awq(view)


@pytest.mark.parametrize("sym,gs", [(True, 16), (False, 16), (False, -1), (True, -1)])
def test_clip_search_never_raises_the_output_error(sym, gs):
    """Shrink 1.0 is a candidate, so each group's dw H dw is at most plain RTN's."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(24, 64, generator=g)
    X = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3, 64)
    H = 2 * X.t() @ X / X.shape[0]
    spec = AWQSpec(bits=3, group_size=gs, sym=sym, clip=True)
    clipped = quantize_weight(W, LayerStats(hessian=H), spec).weight.dequantize(torch.float32)
    plain = fake_quantize(W, QuantSpec(3, gs, sym))
    err = lambda Wq: float(torch.einsum("oi,ij,oj->", Wq - W, H, Wq - W))  # noqa: E731
    assert err(clipped) < err(plain)
    scale, zero = clip_params(W, H, spec)
    assert torch.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize("q", [
    AWQConfig(bits=4, group_size=-1, sym=False, grid=5, clip=False),
    AWQConfig(bits=3, group_size=32, sym=False, max_windows=2, grid=5),
    AWQConfig(bits=4, group_size=32, rounding="gptq", grid=5),
], ids=["asym-per-channel-noclip", "asym-clip-default", "gptq-rounding"])
def test_variants_run_on_every_layer(q, model_dir):
    sm = load_model(ModelConfig(source=str(model_dir("opt")), dtype="float32", device="cpu")).streamed()
    got = {}
    reports = quantize_model(sm, Plan("t", q), IDS, lambda i, b, r: got.update({(i, n): v for n, v in r.items()}))
    assert len(got) == 12 and all(r.method == "awq" for r in reports)
    for res in got.values():
        assert (res.weight.bits, res.weight.group_size, res.weight.sym) == (q.bits, q.group_size, bool(q.sym))  # unset sym: asymmetric
        assert int(res.weight.codes.max()) <= 2**q.bits - 1
    # Only rounding that reads it asks for the Hessian.
    assert get_method("awq").stats_for(q) == ("none" if q.clip is False and q.rounding == "rtn" else "hessian")


def test_config_union_and_sweep_include_awq():
    from compress.stages.quantize import resolve_plans
    from compress.sweep import with_sweep

    cfg = parse_config({"model": {"source": "x"}, "quantize": {"method": "awq", "grid": 10, "clip": True}})
    assert isinstance(cfg.quantize, AWQConfig) and cfg.quantize.grid == 10
    with pytest.raises(ValueError, match="quantize.grid: Input should be greater than or equal to 1"):
        parse_config({"model": {"source": "x"}, "quantize": {"method": "awq", "grid": 0}})
    swept = parse_config({"model": {"source": "x"}, "sweep": {"method": ["rtn", "awq"], "rounding": ["rtn", "gptq"]}})
    names = [p.name for p in resolve_plans(with_sweep(swept))]
    assert names == ["rtn-w4-g128", "awq-w4-g128", "awq-w4-g128-gptq"]
    # clip is AWQ's default (AutoAWQ's apply_clip): only turning it off shows in the name
    off = parse_config({"model": {"source": "x"}, "quantize": {"method": "awq", "clip": False}})
    assert [p.name for p in resolve_plans(off)] == ["awq-w4-g128-noclip"]


def test_clip_is_on_by_default_except_on_a_gguf_grid():
    spec = AWQConfig().spec(4, 64, False)
    assert spec.clip is None and spec.clips
    assert not spec.on_gguf_grid("Q4_K").clips
    assert not AWQConfig(clip=False).spec(4, 64, False).clips
    assert AWQConfig().max_windows == 16


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_pipeline_exports_awq_that_our_loader_reads_back(fmt, model_dir, text_file, tmp_path, monkeypatch):
    from compress.formats.artifact import open_artifact
    from compress.pipeline import run
    from compress.stages import export as export_stage

    seen, norms = {}, {}
    add_block = export_stage.Exporter.add_block

    def spy(self, i, block, results):
        seen.update({(i, n): r.weight for n, r in results.items()})
        norms[i] = block.input_layernorm.weight.detach().clone()
        return add_block(self, i, block, results)

    monkeypatch.setattr(export_stage.Exporter, "add_block", spy)
    folder = model_dir("llama")
    cfg = parse_config(run_config(folder, text_file, tmp_path / "out", export={"dtype": "float32", "format": fmt},
                                  evaluate={"enabled": False}, quantize={"method": "awq", "group_size": 32, "grid": 5}))
    (res,) = run(cfg).candidates.values()
    assert res.artifact is not None
    sm = open_artifact(res.artifact, torch.device("cpu"), torch.float32)
    original = load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu")).streamed()
    for i in range(sm.n_blocks):
        block = sm.load_block(i)
        # The folded norm is what was written, not the checkpoint's.
        torch.testing.assert_close(block.input_layernorm.weight, norms[i])
        assert not torch.allclose(norms[i], original.load_block(i).input_layernorm.weight)
        for (j, name), want in seen.items():
            if j == i:
                got = block.get_submodule(name).quantized_weight()
                assert torch.equal(got.codes, want.codes) and torch.equal(got.g_idx, want.g_idx)
                stored = torch.float16 if fmt == "gptq" else torch.float32  # the format's scale dtype
                torch.testing.assert_close(got.scales, want.scales.to(stored).float())


def test_a_mapping_the_block_does_not_follow_is_checked_and_skipped(tmp_path, tiny_tokenizer, caplog):
    """OPT's post-norm variant: self_attn_layer_norm does not feed q/k/v, so folding into it
    would change the function; the fold check reverts that mapping and says so."""
    folder = save_model(make_model("opt", do_layer_norm_before=False), tmp_path / "opt-post", tiny_tokenizer)
    sm = load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu")).streamed()
    blocks = {}
    with caplog.at_level("WARNING", logger="compress.quantizers.awq"):
        quantize_model(sm, Plan("t", AWQConfig(group_size=32, grid=4)), IDS,
                       lambda i, b, r: blocks.setdefault(i, b.self_attn_layer_norm.weight.detach().clone()))
    assert "self_attn_layer_norm -> self_attn.q_proj" in caplog.text and "folding changed" in caplog.text
    original = load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu")).streamed()
    assert all(torch.equal(w, original.load_block(i).self_attn_layer_norm.weight) for i, w in blocks.items())
