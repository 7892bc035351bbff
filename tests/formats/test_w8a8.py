"""compressed-tensors int-quantized W8A8 (SmoothQuant's artifacts): exact int8 round trips,
the package's own decompression, activation fake-quant against a slow implementation written
here and against compressed-tensors' forward, preflight limits, and the artifact loading in
transformers + compressed-tensors with our logits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")

from compress.config import ConfigError, parse_config  # noqa: E402
from compress.formats import compressed_tensors as ct  # noqa: E402
from compress.formats.artifact import open_artifact  # noqa: E402
from compress.formats.quant_linear import QuantLinear, quantize_activations  # noqa: E402
from compress.formats.registry import LayerScheme, QuantizedLinear, get_format  # noqa: E402
from compress.formats.writer import is_complete  # noqa: E402
from compress.pipeline import run  # noqa: E402
from compress.quantizers.base import QuantSpec  # noqa: E402
from compress.quantizers.rtn import round_to_nearest  # noqa: E402
from compress.quantizers.smoothquant import W8A8, SmoothQuantConfig  # noqa: E402
from tiny_models import make_model, run_config, save_model, walk_logits  # noqa: E402

SPEC = SmoothQuantConfig().spec(8, -1, True)
W8A8_ARGS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def _lin(seed: int = 0, bias: bool = True) -> QuantizedLinear:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(24, 64, generator=g)
    b = torch.randn(24, generator=g) if bias else None
    return QuantizedLinear("l", round_to_nearest(W, SPEC), SPEC.grid, b, SPEC.activations)


def test_int8_layout_and_exact_round_trip():
    lin = _lin()
    t = ct.linear_tensors(lin, torch.float32)
    assert sorted(t) == ["l.bias", "l.weight", "l.weight_scale"]
    assert t["l.weight"].dtype == torch.int8 and t["l.weight"].shape == (24, 64)
    assert t["l.weight"].tolist() == [[c - 128 for c in row] for row in lin.weight.codes.tolist()]
    assert t["l.weight_scale"].shape == (24, 1) and torch.equal(t["l.weight_scale"], lin.weight.scales)
    back, bias = ct.read_linear({k[2:]: v for k, v in t.items()}, {"num_bits": 8, "symmetric": True,
                                                                    "strategy": "channel"}, "l")
    for f in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, f), getattr(lin.weight, f)), f
    assert (back.bits, back.group_size, back.sym) == (8, -1, True) and torch.equal(bias, lin.bias)


def test_the_packages_int_decompressor_gives_our_weights():
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    lin = _lin(1, bias=False)
    t = ct.linear_tensors(lin, torch.float32)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8, strategy="channel"),
                                input_activations=QuantizationArgs(**W8A8_ARGS))
    got = IntQuantizationCompressor.decompress({k[2:]: v for k, v in t.items()}, scheme)["weight"]
    torch.testing.assert_close(got.float(), lin.weight.dequantize(torch.float32), rtol=0, atol=0)


def slow_token_qdq(x: torch.Tensor) -> torch.Tensor:
    """Per token, one float32 scalar at a time (the extreme value of a token lands on a
    rounding tie, where float32 and float64 quotients differ): step = max|x| / 127.5, codes
    clamped to [-128, 127] and rounded half to even (Python's round), times the step."""
    import numpy as np

    f32 = np.float32
    out = []
    for row in x.reshape(-1, x.shape[-1]).numpy():
        step = f32(max(abs(v) for v in row)) / f32(127.5)
        if step == 0:
            step = f32(np.finfo(np.float32).eps)
        out.append([f32(round(float(min(max(f32(v) / step, f32(-128.0)), f32(127.0))))) * step for v in row])
    return torch.tensor(np.array(out, dtype=np.float32)).reshape(x.shape)


def test_activation_qdq_matches_a_slow_implementation_and_the_package():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 9, 64, generator=g) * torch.logspace(-2, 2, 64)
    x[1, 4] = 0  # an all-zero token
    got = quantize_activations(x, W8A8)
    assert torch.equal(got, slow_token_qdq(x))
    args = QuantizationArgs(**W8A8_ARGS)
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=torch.nn.Identity())
    assert torch.equal(got, fake_quantize(x, scale, zp, args))


def test_quant_linear_quantizes_its_input_first():
    lin = _lin(2)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(8))
    W = lin.weight.dequantize(torch.float32)
    want = quantize_activations(x, W8A8) @ W.t() + lin.bias
    torch.testing.assert_close(QuantLinear(lin.weight, lin.bias, W8A8)(x), want, rtol=1e-6, atol=1e-6)
    assert (QuantLinear(lin.weight, lin.bias)(x) - want).abs().max() > 1e-4  # it does change the output


def test_preflight_refuses_what_int_quantized_cannot_hold():
    f = get_format("compressed-tensors")
    assert f.check("a", SPEC, (64, 128), conv1d=False) is None
    w4a8 = QuantSpec(4, 64, True, W8A8)
    assert "int-quantized (W8A8) holds 8-bit per-channel" in f.check("a", w4a8, (64, 128), conv1d=False)
    assert "weight-only" in get_format("gptq").check("a", SPEC, (64, 128), conv1d=False)


def test_config_group_is_llm_compressors_w8a8_preset():
    from compressed_tensors.quantization import preset_name_to_scheme

    f = get_format("compressed-tensors")
    layers = [LayerScheme("m.0.q", 8, -1, True, False, W8A8), LayerScheme("m.0.o", 8, -1, True, False, W8A8)]
    qc = f.quantization_config(SPEC.grid, layers, ["lm_head"], {})
    (group,) = qc["config_groups"].values()
    preset = preset_name_to_scheme("W8A8", ["Linear"]).model_dump()
    for k in ("weights", "input_activations", "targets"):
        assert group[k] == preset[k], k
    assert group["format"] == qc["format"] == "int-quantized" and qc["ignore"] == ["lm_head"]
    # A weight-only layer beside W8A8 ones gets its own pack-quantized group: mixed precision.
    mixed = f.quantization_config(SPEC.grid, layers + [LayerScheme("m.0.d", 4, 64, True, False)], [], {})
    assert mixed["format"] == "mixed-precision"
    assert sorted(g["format"] for g in mixed["config_groups"].values()) == ["int-quantized", "pack-quantized"]


# ---- the artifact in transformers + compressed-tensors ----------------------------------------
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    model = make_model("llama", seed=11, hidden_size=256, intermediate_size=512, num_key_value_heads=4)
    return save_model(model, tmp_path_factory.mktemp("llama256-w8a8"), tiny_tokenizer)


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


SQ = {"method": "smoothquant", "bits": 8, "group_size": -1}


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_w8a8_artifact_loads_in_transformers_with_our_logits(rounding, llama_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = parse_config(run_config(llama_dir, text_file, tmp_path / "out", quantize={**SQ, "rounding": rounding},
                                  export={"format": "compressed-tensors"}))
    ctx = run(cfg)
    (res,) = ctx.candidates.values()
    assert res.error is None and is_complete(res.artifact, check_hashes=True)
    qc = json.loads((res.artifact / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == group["format"] == "int-quantized" and qc["quant_method"] == "compressed-tensors"
    assert {k: group["input_activations"][k] for k in W8A8_ARGS} == W8A8_ARGS
    assert (group["weights"]["num_bits"], group["weights"]["strategy"], group["weights"]["symmetric"]) == (8, "channel", True)

    peer = AutoModelForCausalLM.from_pretrained(str(res.artifact), dtype=torch.float32, device_map="cpu").eval()
    assert type(peer.hf_quantizer).__name__ == "CompressedTensorsHfQuantizer"
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = torch.cat([peer(ids[w : w + 1]).logits for w in range(ids.shape[0])])
        original = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
        ref = torch.cat([original(ids[w : w + 1]).logits for w in range(ids.shape[0])])
    cpu = torch.device("cpu")
    ours = walk_logits(open_artifact(res.artifact, cpu, torch.float32), ids)
    dense = walk_logits(open_artifact(res.artifact, cpu, torch.float32, dense=True), ids)
    # Same int8 weights, same per-token activation rounding, both in float32: equal up to the
    # order of float32 sums (measured: identical).
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(dense, theirs, rtol=0, atol=1e-5 * scale)
    assert mean_kl(ours, theirs) < 1e-9
    # Without the activation fake-quant our loader would be measurably off theirs: the
    # evaluation's KL is W8A8's, not W8A16's.
    weight_only = walk_logits(_without_activation_quant(res.artifact, tmp_path), ids)
    assert mean_kl(weight_only, theirs) > 1e3 * max(mean_kl(ours, theirs), 1e-12)
    assert mean_kl(ref, ours) > 10 * mean_kl(ours, theirs)
    assert res.metrics.kl_divergence > 0


def _without_activation_quant(artifact: Path, tmp_path: Path):
    """Our loader over the same tensors with `input_activations` dropped from the config."""
    import shutil

    copy = tmp_path / "weight-only"
    shutil.copytree(artifact, copy)
    cfg = json.loads((copy / "config.json").read_text())
    for g in cfg["quantization_config"]["config_groups"].values():
        g["input_activations"] = None
    (copy / "config.json").write_text(json.dumps(cfg))
    return open_artifact(copy, torch.device("cpu"), torch.float32)


def test_a_w4_override_under_smoothquant_fails_at_preflight(llama_dir, text_file, tmp_path):
    q = {**SQ, "overrides": [{"pattern": r"mlp\.down_proj", "bits": 4, "group_size": 64}]}
    cfg = parse_config(run_config(llama_dir, text_file, tmp_path / "o", quantize=q))
    with pytest.raises(ConfigError, match=r"compressed-tensors cannot hold layer 'model.layers.0.mlp.down_proj'.*"
                                          r"int-quantized \(W8A8\) holds 8-bit"):
        run(cfg)
    gptq = parse_config(run_config(llama_dir, text_file, tmp_path / "g", quantize=SQ, export={"format": "gptq"}))
    with pytest.raises(ConfigError, match=r"export.format: gptq cannot hold .*weight-only"):
        run(gptq)
