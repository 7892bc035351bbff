"""The MLP-half shortcut of the quantize stage: h + chain(h) is the block's own output for every
family that declares a chain, and GPTQ with the shortcut quantizes exactly as with whole-block
passes (same codes, same block outputs)."""
from __future__ import annotations

import pytest
import torch

import compress.stages.quantize as quantize_stage
from compress.config import ModelConfig
from compress.quantizers.gptq import GPTQConfig
from compress.stages.load import load_model
from compress.stages.passes import mlp_chain, split_matches
from compress.stages.quantize import Plan, quantize_model
from tiny_models import FAMILIES, VOCAB


def _streamed(model_dir, family):
    return load_model(ModelConfig(source=str(model_dir(family)), dtype="float32", device="cpu")).streamed()


def _ids():
    return torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", FAMILIES + ("qwen3", "gemma2"))
def test_every_family_declares_a_chain_that_reproduces_its_block(family, model_dir):
    sm = _streamed(model_dir, family)
    chain = mlp_chain(sm)
    assert chain, f"{family}: no MLP-half chain declared"
    hidden = sm.embed(_ids())
    for i in range(sm.n_blocks):
        assert split_matches(sm, sm.load_block(i), i, chain, hidden.read(0, 2)), (family, i)


def test_a_wrong_chain_is_detected(model_dir):
    sm = _streamed(model_dir, "gemma3_text")
    hidden = sm.embed(_ids())
    # Gemma 3 normalises after its MLP: leaving that norm out must not pass for its block.
    assert not split_matches(sm, sm.load_block(0), 0, ("pre_feedforward_layernorm", "mlp"), hidden.read(0, 2))


def _quantize(sm, ids, spool_dir=None):
    got = {}

    def sink(i, block, results):
        got.update({f"{i}.{n}": r.weight for n, r in results.items()})

    q = GPTQConfig(bits=4, group_size=32, desc_act=True)
    quantize_model(sm, Plan("t", q), ids, sink, spool_dir)
    return got


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt", "gpt2"])
def test_gptq_with_the_mlp_shortcut_equals_whole_block_passes(family, model_dir, monkeypatch):
    ids = _ids()
    used = []
    real = quantize_stage.mlp_forward
    monkeypatch.setattr(quantize_stage, "mlp_forward", lambda *a: used.append(1) or real(*a))
    fast = _quantize(_streamed(model_dir, family), ids)
    assert used, "the shortcut was not taken"
    monkeypatch.setattr(quantize_stage, "mlp_chain", lambda sm: ())
    slow = _quantize(_streamed(model_dir, family), ids)
    assert fast.keys() == slow.keys() and fast
    for name in fast:
        a, b = fast[name], slow[name]
        assert torch.equal(a.g_idx, b.g_idx), name
        differ = (a.codes != b.codes).float().mean().item()
        assert differ <= 0.001, f"{name}: {differ:.4%} of codes differ"
        torch.testing.assert_close(a.scales, b.scales, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_gptq_with_activations_on_disk_equals_in_memory(family, model_dir, tmp_path):
    """Spooling the calibration stream to a file changes where it waits, not one code."""
    ids = _ids()
    in_memory = _quantize(_streamed(model_dir, family), ids)
    on_disk = _quantize(_streamed(model_dir, family), ids, tmp_path)
    assert in_memory.keys() == on_disk.keys() and in_memory
    for name in in_memory:
        a, b = in_memory[name], on_disk[name]
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales), name
        assert torch.equal(a.g_idx, b.g_idx), name
    assert list(tmp_path.iterdir()) == []
