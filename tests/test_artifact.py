"""Our artifact loader computes the fake-quantized model: streamed logits match a reference.

The reference is built here, independently of the pipeline's export and reader: a copy of
the original model whose quantized linears hold ``QuantizedWeight.dequantize()`` with the
scales (and biases) rounded to what the format stores (fp16 for GPTQ v1, `export.dtype` for
compressed-tensors), and every other tensor rounded to `export.dtype`.
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
from compress.quantizers import METHODS, QuantSpec
from compress.quantizers.rtn import round_to_nearest as rtn
from compress.stages import export as export_stage
from compress.stages.quantize import block_linears
from tiny_models import VOCAB, run_config, walk_logits

CPU = torch.device("cpu")


def original_model(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()


def rounded_scales(qw: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
    return dataclasses.replace(qw, scales=qw.scales.to(dtype).to(torch.float32))


def fake_quant_reference(model, qweights_of, other_dtype: torch.dtype, scale_dtype: torch.dtype = torch.float16):
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
                Wq = rounded_scales(qw, scale_dtype).dequantize(torch.float32)
                mod.weight.copy_(Wq.t() if arch.conv1d else Wq)
                quantized.add(mod.weight)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(mod.bias.to(scale_dtype).float())  # stored like the scales
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


# Scales as each format stores them with export.dtype float32: GPTQ v1 always in fp16.
SCALE_DTYPE = {"gptq": torch.float16, "compressed-tensors": torch.float32}


@pytest.mark.parametrize("family,bits,group_size,fmt", [
    ("llama", 4, 64, "gptq"), ("llama", 8, -1, "gptq"), ("opt", 4, 64, "gptq"), ("gpt2", 3, 128, "gptq"),
    ("qwen2", 2, 32, "gptq"), ("llama", 4, 64, "compressed-tensors"), ("llama", 8, -1, "compressed-tensors"),
    ("opt", 3, 64, "compressed-tensors"), ("qwen2", 2, 32, "compressed-tensors"),
])
def test_rtn_artifact_matches_fake_quant_reference(family, bits, group_size, fmt, model_dir, text_file, tmp_path):
    folder = model_dir(family)
    cfg = parse_config(run_config(
        folder, text_file, tmp_path / "out", quantize={"bits": bits, "group_size": group_size},
        export={"dtype": "float32", "format": fmt}, evaluate={"enabled": False},
    ))
    ctx = run(cfg)
    (res,) = ctx.candidates.values()
    spec = QuantSpec(bits=bits, group_size=group_size, sym=False)  # the default grid
    original = original_model(folder)
    ref = fake_quant_reference(original, lambda i, n, W: rtn(W, spec), torch.float32, SCALE_DTYPE[fmt])
    _check(ref, original, res.artifact)


def test_default_fp16_export_matches_reference_rounded_to_fp16(model_dir, text_file, tmp_path):
    """With `export.dtype: float16` (the default) embeddings and norms are stored in fp16."""
    folder = model_dir("gemma3_text")
    cfg = parse_config(run_config(folder, text_file, tmp_path / "out", evaluate={"enabled": False}))
    assert cfg.export.dtype == "float16"
    ctx = run(cfg)
    (res,) = ctx.candidates.values()
    spec = QuantSpec(bits=4, group_size=64, sym=False)  # the default grid
    original = original_model(folder)
    ref = fake_quant_reference(original, lambda i, n, W: rtn(W, spec), torch.float16)
    _check(ref, original, res.artifact)


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_skip_and_overrides_round_trip_exactly(fmt, model_dir, text_file, tmp_path, monkeypatch):
    """`skip` keeps a layer in float; overrides give layers their own bits, group size and
    symmetry. Every layer read back from the file is the QuantizedWeight that was exported
    (codes, scales as stored, zeros, g_idx, bits, group size, sym), and the logits match."""
    seen: dict[str, QuantizedWeight] = {}
    add_block = export_stage.Exporter.add_block

    def spy(self, i, block, results):
        seen.update({f"{i}.{n}": r.weight for n, r in results.items()})
        return add_block(self, i, block, results)

    monkeypatch.setattr(export_stage.Exporter, "add_block", spy)
    folder = model_dir("llama")
    cfg = parse_config(run_config(
        folder, text_file, tmp_path / "out", export={"dtype": "float32", "format": fmt}, evaluate={"enabled": False},
        quantize={"skip": [r"layers\.0\.mlp\.down_proj"],
                  "overrides": [{"pattern": r"self_attn\.v_proj", "bits": 8, "group_size": -1},
                                {"pattern": r"layers\.1\.mlp\.up_proj", "sym": True, "bits": 3, "group_size": 32}]},
    ))
    ctx = run(cfg)
    (res,) = ctx.candidates.values()
    specs = {"self_attn.v_proj": QuantSpec(bits=8, group_size=-1, sym=False), "1.mlp.up_proj": QuantSpec(3, 32, True)}

    def spec_of(i, name):
        return specs.get(name) or specs.get(f"{i}.{name}") or QuantSpec(bits=4, group_size=64, sym=False)

    sm = open_artifact(res.artifact, CPU, torch.float32)
    for i in range(sm.n_blocks):
        block = sm.load_block(i)
        for name in (n for g in block_linears(block, sm.arch.sequential) for n in g):
            mod = block.get_submodule(name)
            if (i, name) == (0, "mlp.down_proj"):
                assert f"{i}.{name}" not in seen and isinstance(mod, torch.nn.Linear)
                continue
            got, want = mod.quantized_weight(), rounded_scales(seen[f"{i}.{name}"], SCALE_DTYPE[fmt])
            spec = spec_of(i, name)
            assert (got.bits, got.group_size, got.sym) == (want.bits, want.group_size, want.sym) == (
                spec.bits, spec.group_size, spec.sym)
            for field in ("codes", "scales", "zeros", "g_idx"):
                assert torch.equal(getattr(got, field), getattr(want, field).to(getattr(got, field).dtype)), field

    def qweights_of(i, name, W):
        return None if (i, name) == (0, "mlp.down_proj") else rtn(W, spec_of(i, name))

    original = original_model(folder)
    _check(fake_quant_reference(original, qweights_of, torch.float32, SCALE_DTYPE[fmt]), original, res.artifact)


@pytest.mark.skipif("gptq" not in METHODS, reason="no GPTQ method registered")
@pytest.mark.parametrize("desc_act,fmt", [(False, "compressed-tensors"), (True, "gptq")])
def test_gptq_artifact_matches_the_weights_it_was_given(desc_act, fmt, model_dir, text_file, tmp_path, monkeypatch):
    """GPTQ weights depend on calibration, so the reference takes the QuantizedWeights the
    quantize stage handed to the exporter and dequantizes them itself (act-order included)."""
    seen: dict[tuple[int, str], QuantizedWeight] = {}
    add_block = export_stage.Exporter.add_block

    def spy(self, i, block, results):
        seen.update({(i, n): r.weight for n, r in results.items()})
        return add_block(self, i, block, results)

    monkeypatch.setattr(export_stage.Exporter, "add_block", spy)
    folder = model_dir("llama")
    cfg = parse_config(run_config(
        folder, text_file, tmp_path / "out", export={"dtype": "float32", "format": fmt}, evaluate={"enabled": False},
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
        assert not torch.equal(qw.codes, rtn(W, QuantSpec(bits=4, group_size=64)).codes)
        return qw

    _check(fake_quant_reference(original, qweights_of, torch.float32, SCALE_DTYPE[fmt]), original, res.artifact)
