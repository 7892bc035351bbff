"""Our artifact loader computes the fake-quantized model: streamed logits match a reference.

The reference is built here, independently of the pipeline's export and reader: a copy of
the original model whose quantized linears hold ``QuantizedWeight.dequantize()`` with the
scales rounded to fp16 (what GPTQ v1 stores), biases rounded to fp16 likewise, and every
other tensor rounded to `export.dtype`.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.config import parse_config
from compress.formats.artifact import open_artifact
from compress.formats.qweight import QuantizedWeight
from compress.models.arch import arch_for
from compress.pipeline import run
from compress.quantizers import QUANTIZERS, QuantSpec
from compress.quantizers.rtn import quantize_weight as rtn
from compress.stages import export as export_stage
from compress.stages.quantize import block_linears
from tiny_models import VOCAB, run_config, walk_logits

CPU = torch.device("cpu")


def original_model(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()


def fp16_scales(qw: QuantizedWeight) -> QuantizedWeight:
    return dataclasses.replace(qw, scales=qw.scales.to(torch.float16).to(torch.float32))


def fake_quant_reference(model, qweights_of, other_dtype: torch.dtype):
    """`model` with each quantized linear replaced by its dequantized weight.

    qweights_of(i, name, W[out, in]) -> QuantizedWeight, or None to leave the layer alone.
    """
    ref = copy.deepcopy(model)
    arch = arch_for(ref.config.model_type)
    blocks = ref.get_submodule(arch.blocks)
    quantized = set()
    with torch.no_grad():
        for i, block in enumerate(blocks):
            for name in (n for g in block_linears(block, arch.sequential) for n in g):
                mod = block.get_submodule(name)
                W = mod.weight.t() if arch.conv1d else mod.weight
                qw = qweights_of(i, name, W.detach().clone())
                if qw is None:
                    continue
                Wq = fp16_scales(qw).dequantize(torch.float32)
                mod.weight.copy_(Wq.t() if arch.conv1d else Wq)
                quantized.add(mod.weight)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(mod.bias.half().float())  # GPTQ v1 stores biases in fp16
                    quantized.add(mod.bias)
        for p in ref.parameters():
            if p not in quantized:
                p.copy_(p.to(other_dtype).float())
    return ref


def artifact_logits(path, ids: torch.Tensor) -> torch.Tensor:
    return walk_logits(open_artifact(path, CPU, torch.float32), ids)


def model_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(ids[w : w + 1], use_cache=False).logits for w in range(ids.shape[0])])


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def _check(ref_model, original, path):
    ref = model_logits(ref_model, IDS)
    got = artifact_logits(path, IDS)
    scale = ref.abs().max().item()
    # Quantization moves the logits far beyond the tolerance, so agreement is not vacuous.
    assert (model_logits(original, IDS) - ref).abs().max().item() > 0.02 * scale
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("family,bits,group_size", [
    ("llama", 4, 64), ("llama", 8, -1), ("opt", 4, 64), ("gpt2", 3, 128), ("qwen2", 2, 32),
])
def test_rtn_artifact_matches_fake_quant_reference(family, bits, group_size, model_dir, text_file, tmp_path):
    folder = model_dir(family)
    cfg = parse_config(run_config(
        folder, text_file, tmp_path / "out", quantize={"bits": bits, "group_size": group_size},
        export={"dtype": "float32"}, evaluate={"enabled": False},
    ))
    ctx = run(cfg)
    (res,) = ctx.candidates.values()
    spec = QuantSpec(bits=bits, group_size=group_size, sym=True)
    original = original_model(folder)
    ref = fake_quant_reference(original, lambda i, n, W: rtn(W, None, spec), torch.float32)
    _check(ref, original, res.artifact)


def test_default_fp16_export_matches_reference_rounded_to_fp16(model_dir, text_file, tmp_path):
    """With `export.dtype: float16` (the default) embeddings and norms are stored in fp16."""
    folder = model_dir("gemma3_text")
    cfg = parse_config(run_config(folder, text_file, tmp_path / "out", evaluate={"enabled": False}))
    assert cfg.export.dtype == "float16"
    ctx = run(cfg)
    (res,) = ctx.candidates.values()
    spec = QuantSpec(bits=4, group_size=64, sym=True)
    original = original_model(folder)
    ref = fake_quant_reference(original, lambda i, n, W: rtn(W, None, spec), torch.float16)
    _check(ref, original, res.artifact)


def test_skip_and_override_layers_load_with_their_own_geometry(model_dir, text_file, tmp_path):
    """`skip` keeps a layer in float; an override gives another its own bits and group size."""
    folder = model_dir("llama")
    cfg = parse_config(run_config(
        folder, text_file, tmp_path / "out", export={"dtype": "float32"}, evaluate={"enabled": False},
        quantize={"skip": [r"layers\.0\.mlp\.down_proj"],
                  "overrides": [{"pattern": r"self_attn\.v_proj", "bits": 8, "group_size": -1}]},
    ))
    ctx = run(cfg)
    (res,) = ctx.candidates.values()

    def qweights_of(i, name, W):
        if (i, name) == (0, "mlp.down_proj"):
            return None
        if name == "self_attn.v_proj":
            return rtn(W, None, QuantSpec(bits=8, group_size=-1))
        return rtn(W, None, QuantSpec(bits=4, group_size=64))

    original = original_model(folder)
    _check(fake_quant_reference(original, qweights_of, torch.float32), original, res.artifact)


@pytest.mark.skipif("gptq" not in QUANTIZERS, reason="no GPTQ quantizer registered")
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_artifact_matches_the_weights_it_was_given(desc_act, model_dir, text_file, tmp_path, monkeypatch):
    """GPTQ weights depend on calibration, so the reference takes the QuantizedWeights the
    quantize stage handed to the exporter and dequantizes them itself (act-order included)."""
    seen: dict[tuple[int, str], QuantizedWeight] = {}
    add_block = export_stage.GPTQExporter.add_block

    def spy(self, i, block, qweights):
        seen.update({(i, n): qw for n, qw in qweights.items()})
        return add_block(self, i, block, qweights)

    monkeypatch.setattr(export_stage.GPTQExporter, "add_block", spy)
    folder = model_dir("llama")
    cfg = parse_config(run_config(
        folder, text_file, tmp_path / "out", export={"dtype": "float32"}, evaluate={"enabled": False},
        quantize={"method": "gptq", "bits": 4, "group_size": 64, "desc_act": desc_act,
                  "static_groups": False},
    ))
    ctx = run(cfg)
    (res,) = ctx.candidates.values()
    assert len(seen) == 14
    permuted = any(not torch.equal(qw.g_idx, torch.sort(qw.g_idx).values) for qw in seen.values())
    assert permuted == desc_act
    original = original_model(folder)

    def qweights_of(i, name, W):
        qw = seen[(i, name)]
        # GPTQ differs from RTN on the same weights: the reference is not RTN by accident.
        assert not torch.equal(qw.codes, rtn(W, None, QuantSpec(bits=4, group_size=64)).codes)
        return qw

    _check(fake_quant_reference(original, qweights_of, torch.float32), original, res.artifact)
