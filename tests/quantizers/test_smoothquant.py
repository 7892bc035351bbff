"""SmoothQuant: the scales follow the paper's formula (checked against a per-channel loop),
the smoothed float model computes the same logits as the original, smoothing lowers the W8A8
error where activations have outlier channels, and the config keeps W8A8's grid."""
from __future__ import annotations

import pytest
import torch

from compress.config import ModelConfig, parse_config
from compress.formats.quant_linear import quantize_activations
from compress.quantizers import get_method
from compress.quantizers.base import BlockView
from compress.quantizers.channel_stats import ChannelAbsMax
from compress.quantizers.rtn import round_to_nearest
from compress.quantizers.smoothquant import (
    W8A8, SmoothQuantConfig, apply_smoothquant, smoothing_scales,
)
from compress.stages.load import load_model
from compress.stages.passes import block_forward, collect_stats
from tiny_models import HEADS, VOCAB, make_model, save_model, walk_logits

IDS = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))


def test_channel_absmax_is_split_invariant_and_the_max_of_abs():
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole, parts = ChannelAbsMax(16, dtype=torch.float64), ChannelAbsMax(16, dtype=torch.float64)
    whole.add(x)
    for b in range(3):
        parts.add(x[b, :2])
        parts.add(x[b, 2:])
    expected = [max(abs(float(v)) for v in x.reshape(-1, 16)[:, j]) for j in range(16)]
    assert whole.result.tolist() == expected == parts.result.tolist()


def test_scales_follow_equation_4_channel_by_channel():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(12, generator=g) * 10
    x[4] = 0.0  # never activated: left alone
    Ws = [torch.randn(5, 12, generator=g), torch.randn(7, 12, generator=g)]
    Ws[0][:, 9] = 0
    Ws[1][:, 9] = 0  # an all-zero weight column: s = max|X|
    for alpha in (0.0, 0.5, 0.8):
        s = smoothing_scales(x, Ws, alpha)
        for j in range(12):
            wmax = max(abs(float(W[r, j])) for W in Ws for r in range(W.shape[0]))
            if float(x[j]) == 0:
                want = 1.0
            elif wmax == 0:
                want = float(x[j])
            else:
                want = float(x[j]) ** alpha / wmax ** (1 - alpha)
            assert float(s[j]) == pytest.approx(want, rel=1e-5), (alpha, j)


def test_smoothing_balances_activation_and_weight_ranges():
    """With alpha 0.5, max|X_j / s_j| == max|W_j * s_j| for every channel (the paper's point)."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(32, generator=g) * 50 + 0.1
    W = torch.randn(16, 32, generator=g)
    s = smoothing_scales(x, [W], 0.5)
    torch.testing.assert_close(x / s, (W * s).abs().amax(0), rtol=1e-5, atol=0)


def _w8a8_error(X: torch.Tensor, W: torch.Tensor, s: torch.Tensor) -> float:
    """Relative output error of int8 per-channel weights with per-token int8 inputs."""
    Xs, Wsc = X / s, W * s
    Wq = round_to_nearest(Wsc, SmoothQuantConfig().spec(8, -1, True)).dequantize()
    Y = quantize_activations(Xs, W8A8) @ Wq.t()
    ref = X @ W.t()
    return float((Y - ref).norm() / ref.norm())


def test_smoothing_lowers_w8a8_error_with_outlier_channels():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(256, 64, generator=g)
    X[:, [3, 17, 40]] *= 60  # outlier channels, as LLM activations have
    W = torch.randn(48, 64, generator=g) * 0.05
    plain = _w8a8_error(X, W, torch.ones(64))
    smooth = _w8a8_error(X, W, smoothing_scales(X.abs().amax(0), [W], 0.5))
    assert smooth < 0.5 * plain, (smooth, plain)


def _smoothed_logits(folder, q: SmoothQuantConfig) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of the float model with SmoothQuant's scales folded into every block (no
    rounding), and each block's q_proj weight after folding."""
    sm = load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu")).streamed()
    folded = []

    def process(i, block, stream):
        whole = block_forward(sm, block, i)
        apply_smoothquant(BlockView(
            i, block, sm.arch, q, stream,
            lambda names, kind: collect_stats(sm, block, names, stream, torch.float32, True, whole, kind=kind),
            forward=lambda x: sm.block_output(block, i, x), batch_size=sm.batch_size))
        folded.append(block.get_submodule(sm.arch.awq[0].balance[0]).weight.detach().clone())
        sm.run_block(block, i, stream)

    with sm.embed(IDS) as hidden:
        sm.walk(hidden, process, "smooth")
        logits = torch.cat([sm.logits(hidden.read(w, w + 1), IDS[w : w + 1]) for w in range(IDS.shape[0])])
    return logits, folded


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen2", "opt"])
def test_smoothing_is_function_preserving(family, tmp_path, tiny_tokenizer, caplog):
    kw = {} if family == "opt" else {"num_key_value_heads": HEADS}
    model = make_model(family, **kw)
    with torch.no_grad():  # outlier channels at the norms' outputs, so the scales are far from 1
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
                p[[3, 40]] *= 20
    folder = save_model(model, tmp_path / family, tiny_tokenizer)
    ref = walk_logits(load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu")).streamed(), IDS)
    got, folded = _smoothed_logits(folder, SmoothQuantConfig())
    orig_q = model.get_submodule(f"{'model.decoder' if family == 'opt' else 'model'}.layers.0.self_attn.q_proj").weight
    ratio = (folded[0] / orig_q.detach()).abs()
    assert float(ratio.max() / ratio.min()) > 3  # the fold really moved weights, unevenly
    assert "folding changed" not in caplog.text  # every mapping was folded, none reverted
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-4 * float(ref.abs().max()))


def test_config_holds_w8a8_and_names_a_wrong_grid():
    q = parse_config({"model": {"source": "x"}, "quantize": {"method": "smoothquant"}}).quantize
    assert (q.bits, q.group_size, q.sym, q.alpha, q.rounding) == (8, -1, True, 0.5, "rtn")
    spec = q.spec(8, -1, True)
    assert spec.activations == W8A8 and spec.grid.activations == W8A8
    assert get_method("smoothquant").stats_for(q) == "none"
    assert get_method("smoothquant").stats_for(q.model_copy(update={"rounding": "gptq"})) == "hessian"
    with pytest.raises(ValueError, match=r"quantize.bits: Input should be 8"):
        parse_config({"model": {"source": "x"}, "quantize": {"method": "smoothquant", "bits": 4}})
    with pytest.raises(ValueError, match=r"quantize.alpha"):
        parse_config({"model": {"source": "x"}, "quantize": {"method": "smoothquant", "alpha": 1.5}})
