"""The method contract seen from the engine: a method declared in a test (its own config,
per-channel activation statistics, a block transform that folds scales into a norm) runs
through `quantize_model` unchanged, and the engine honours every declaration."""
from __future__ import annotations

from typing import Literal

import pytest
import torch

from compress.config import ModelConfig
from compress.quantizers.base import (
    METHODS, BlockView, CalibratedConfig, LayerStats, Method, QuantResult, QuantSpec,
)
from compress.quantizers.channel_stats import ChannelMagnitude
from compress.quantizers.rtn import round_to_nearest
from compress.stages.load import load_model
from compress.stages.quantize import Plan, quantize_model
from tiny_models import VOCAB


class FoldConfig(CalibratedConfig):
    method: Literal["test-fold"] = "test-fold"
    alpha: float = 0.5


def test_channel_magnitude_is_split_invariant():
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = ChannelMagnitude(16, dtype=torch.float64)
    whole.add(x)
    parts = ChannelMagnitude(16, dtype=torch.float64)
    for b in range(3):
        parts.add(x[b, :3])
        parts.add(x[b, 3:])
    torch.testing.assert_close(whole.result, parts.result, rtol=1e-12, atol=0)
    torch.testing.assert_close(whole.result, x.reshape(-1, 16).abs().mean(0), rtol=1e-12, atol=0)


def test_engine_collects_declared_stats_and_applies_the_block_transform_first(model_dir, monkeypatch):
    seen_transform: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    seen_stats: dict[str, LayerStats] = {}

    def fold(view: BlockView) -> None:
        """Scale the MLP's input channels: norm / s, gate and up * s (output unchanged)."""
        mag = view.collect(["mlp.gate_proj"], "act_magnitude")["mlp.gate_proj"]
        s = mag.clamp_min(1e-5) ** view.config.alpha
        b = view.block
        with torch.no_grad():
            b.post_attention_layernorm.weight.div_(s)
            b.mlp.gate_proj.weight.mul_(s)
            b.mlp.up_proj.weight.mul_(s)
        seen_transform.append((view.index, mag.clone(), b.mlp.gate_proj.weight.detach().clone()))

    def quantize(W: torch.Tensor, stats: LayerStats, spec: QuantSpec) -> QuantResult:
        seen_stats[f"{W.shape}-{len(seen_stats)}"] = stats
        return QuantResult(round_to_nearest(W, spec), spec.grid)

    monkeypatch.setitem(METHODS, "test-fold", Method("test-fold", FoldConfig, quantize, "act_magnitude", fold))
    folder = model_dir("llama")
    sm = load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu")).streamed()
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))

    # The reference statistic for block 0: mean |input of gate_proj| in the original model.
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    acc = ChannelMagnitude(ref_model.config.hidden_size)
    h = ref_model.model.layers[0].mlp.gate_proj.register_forward_pre_hook(lambda m, a: acc.add(a[0]))
    with torch.no_grad():
        for w in range(ids.shape[0]):
            ref_model(ids[w : w + 1])
    h.remove()

    got: dict[tuple[int, str], QuantResult] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}

    def sink(i, block, results):
        got.update({(i, n): r for n, r in results.items()})
        blocks[i] = {k: v.clone() for k, v in block.state_dict().items()}

    quantize_model(sm, Plan("t", FoldConfig(bits=4, group_size=32)), ids, sink)

    assert [t[0] for t in seen_transform] == [0, 1]
    torch.testing.assert_close(seen_transform[0][1], acc.result, rtol=1e-5, atol=1e-7)
    # Every layer received its own per-channel magnitude and no Hessian.
    assert len(seen_stats) == 14
    assert all(s.act_magnitude is not None and s.hessian is None for s in seen_stats.values())
    for i, _, scaled_gate in seen_transform:
        # The codes are RTN of the transformed weight: the transform ran before quantization.
        want = round_to_nearest(scaled_gate, QuantSpec(4, 32, sym=False))
        assert torch.equal(got[(i, "mlp.gate_proj")].weight.codes, want.codes)
    # The folded norm reaches the exporter with the block.
    orig_norm = ref_model.model.layers[0].post_attention_layernorm.weight.detach()
    s0 = seen_transform[0][1].clamp_min(1e-5) ** 0.5
    torch.testing.assert_close(blocks[0]["post_attention_layernorm.weight"], orig_norm / s0)


def test_a_method_without_calibration_never_embeds(model_dir, monkeypatch):
    sm = load_model(ModelConfig(source=str(model_dir("opt")), dtype="float32", device="cpu")).streamed()
    monkeypatch.setattr(type(sm), "embed", lambda *a, **k: pytest.fail("RTN must not read calibration data"))
    from compress.quantizers.rtn import RTNConfig

    out = {}
    quantize_model(sm, Plan("r", RTNConfig(bits=4, group_size=32)), None, lambda i, b, r: out.update(r))
    assert out


def test_without_propagation_or_statistics_each_transform_sees_its_blocks_original_inputs(model_dir, monkeypatch):
    """A method with only a block transform (no per-layer statistic) and `propagate: false`:
    block i's transform reads block i's inputs in the original model (the stream still advances
    through each original block), and so does the head's Hessian after the last block."""
    seen: dict[int, torch.Tensor] = {}

    def look(view: BlockView) -> None:
        seen[view.index] = view.inputs.read(0, len(view.inputs)).clone()

    def quantize(W: torch.Tensor, stats: LayerStats, spec: QuantSpec) -> QuantResult:
        return QuantResult(round_to_nearest(W, spec), spec.grid)

    monkeypatch.setitem(METHODS, "test-fold", Method("test-fold", FoldConfig, quantize, "none", look))
    folder = model_dir("llama")
    sm = load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu")).streamed()
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(6))
    quantize_model(sm, Plan("t", FoldConfig(bits=4, group_size=32, propagate=False)), ids, lambda i, b, r: None)

    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        states = [ref(ids[w : w + 1], output_hidden_states=True).hidden_states for w in range(3)]
    assert sorted(seen) == [0, 1]
    for i in (0, 1):
        torch.testing.assert_close(seen[i], torch.cat([s[i] for s in states]), rtol=1e-4, atol=1e-5)
