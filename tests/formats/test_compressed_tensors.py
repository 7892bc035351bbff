"""compressed-tensors pack-quantized: exact layout against a slow packer written here, exact
round trips, preflight limits, per-layer config groups, and loading in transformers +
compressed-tensors with our logits (both installed with compress, so this runs in CI)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")

from compress.config import parse_config  # noqa: E402
from compress.formats import compressed_tensors as ct  # noqa: E402
from compress.formats.artifact import open_artifact  # noqa: E402
from compress.formats.registry import LayerScheme, QuantizedLinear, get_format  # noqa: E402
from compress.formats.writer import is_complete  # noqa: E402
from compress.pipeline import run  # noqa: E402
from compress.quantizers.base import QuantSpec  # noqa: E402
from compress.quantizers.gptq import GPTQSpec  # noqa: E402
from compress.quantizers.rtn import round_to_nearest  # noqa: E402
from tiny_models import make_model, run_config, save_model, walk_logits  # noqa: E402


def slow_pack_rows(values: list[list[int]], bits: int) -> list[list[int]]:
    """Each row's values as one little-endian bit stream cut into signed 32-bit words."""
    out = []
    for row in values:
        stream = 0
        for k, v in enumerate(row):
            stream |= v << (bits * k)
        n_words = -(-len(row) * bits // 32)
        words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
        out.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])
    return out


CASES = [(b, g, s) for b in (2, 3, 4, 8) for g in (32, -1) for s in (True, False)]


@pytest.mark.parametrize("bits,group_size,sym", CASES)
def test_layout_matches_slow_packer_and_round_trips(bits, group_size, sym):
    W = torch.randn(40, 128, generator=torch.Generator().manual_seed(bits * 10 + group_size))
    qw = round_to_nearest(W, QuantSpec(bits, group_size, sym))
    t = ct.linear_tensors(QuantizedLinear("l", qw, QuantSpec(bits, group_size, sym)), torch.float32)
    assert t["l.weight_packed"].tolist() == slow_pack_rows(qw.codes.long().tolist(), bits)
    assert t["l.weight_shape"].tolist() == [40, 128]
    assert torch.equal(t["l.weight_scale"], qw.scales)
    if sym:
        assert "l.weight_zero_point" not in t
    else:  # zero points packed along the output dim: the transposed rows of [out, G]
        zp = slow_pack_rows(qw.zeros.long().t().tolist(), bits)
        assert t["l.weight_zero_point"].t().tolist() == zp
    args = {"num_bits": bits, "symmetric": sym, "strategy": "channel" if group_size == -1 else "group",
            "group_size": None if group_size == -1 else group_size}
    back, bias = ct.read_linear({k[2:]: v for k, v in t.items()}, args, "l")
    assert bias is None
    for f in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, f), getattr(qw, f)), f
    assert (back.bits, back.group_size, back.sym) == (bits, group_size, sym)


def test_signed_grid_is_the_packages_own_dequantization():
    """Our unsigned codes/zeros, shifted by 2**(bits-1), dequantize to the same weights through
    compressed-tensors' own decompressor."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    qw = round_to_nearest(W, QuantSpec(4, 32, False))
    t = ct.linear_tensors(QuantizedLinear("l", qw, QuantSpec(4, 32, False)), torch.float32)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, symmetric=False, strategy="group", group_size=32))
    got = PackedQuantizationCompressor.decompress({k[2:]: v for k, v in t.items()}, scheme)["weight"]
    torch.testing.assert_close(got.float(), qw.dequantize(torch.float32), rtol=0, atol=1e-6)


def test_preflight_names_what_the_format_cannot_hold():
    f = get_format("compressed-tensors")
    assert f.check("a", QuantSpec(4, 64), (64, 128), conv1d=False) is None
    assert "Conv1D" in f.check("a", QuantSpec(4, 64), (64, 128), conv1d=True)
    permuted = GPTQSpec(4, 64, desc_act=True, static_groups=False)
    assert "static_groups: true" in f.check("a", permuted, (64, 128), conv1d=False)
    assert f.check("a", GPTQSpec(4, 64, desc_act=True, static_groups=True), (64, 128), conv1d=False) is None
    assert "GPTQ layout" in get_format("gptq").check("a", QuantSpec(3, 64), (16, 128), conv1d=False)


def test_config_groups_give_overrides_exact_names():
    f = get_format("compressed-tensors")
    layers = [LayerScheme("m.0.q", 4, 64, True, False), LayerScheme("m.0.v", 8, -1, True, False),
              LayerScheme("m.1.up", 3, 32, False, False), LayerScheme("m.1.q", 4, 64, True, False)]
    qc = f.quantization_config(QuantSpec(4, 64, True), layers, ["m.0.down"], {"act_order": True})
    groups = qc["config_groups"]
    assert groups["group_0"]["targets"] == ["Linear"]
    w0 = groups["group_0"]["weights"]
    assert (w0["num_bits"], w0["group_size"], w0["strategy"], w0["symmetric"], w0["actorder"]) == (4, 64, "group", True, "weight")
    by_target = {tuple(g["targets"]): g["weights"] for g in groups.values()}
    assert by_target[("m.0.v",)]["strategy"] == "channel" and by_target[("m.0.v",)]["num_bits"] == 8
    assert by_target[("m.1.up",)]["symmetric"] is False and by_target[("m.1.up",)]["group_size"] == 32
    assert qc["ignore"] == ["m.0.down"] and qc["format"] == "pack-quantized"
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    lookup = ct._scheme_lookup(qc)
    assert lookup("m.1.up")["weights"]["num_bits"] == 3 and lookup("m.5.q")["weights"]["num_bits"] == 4


# ---- loading in transformers + compressed-tensors -------------------------------------------
VOCAB = 512


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    model = make_model("llama", seed=11, hidden_size=256, intermediate_size=512, num_key_value_heads=4)
    return save_model(model, tmp_path_factory.mktemp("llama256-ct"), tiny_tokenizer)


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("quantize", [
    {"method": "rtn", "bits": 4, "group_size": 128},
    {"method": "rtn", "bits": 8, "group_size": -1, "sym": False},
    {"method": "gptq", "bits": 4, "group_size": 64, "desc_act": True,
     "overrides": [{"pattern": r"layers\.1\.mlp\.down_proj", "bits": 8, "group_size": -1, "sym": False}]},
], ids=["rtn-w4-g128", "rtn-w8-ch-asym", "gptq-w4-g64-act-override"])
def test_pipeline_artifact_loads_in_transformers_with_our_logits(quantize, llama_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = parse_config(run_config(llama_dir, text_file, tmp_path / "out", evaluate={"enabled": False},
                                  quantize=quantize, export={"format": "compressed-tensors"}))
    ctx = run(cfg)
    (res,) = ctx.candidates.values()
    assert res.error is None and is_complete(res.artifact, check_hashes=True)
    peer = AutoModelForCausalLM.from_pretrained(str(res.artifact), dtype=torch.float32, device_map="cpu").eval()
    assert type(peer.hf_quantizer).__name__ == "CompressedTensorsHfQuantizer"
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = torch.cat([peer(ids[w : w + 1]).logits for w in range(ids.shape[0])])
        original = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
        ref = torch.cat([original(ids[w : w + 1]).logits for w in range(ids.shape[0])])
    ours = walk_logits(open_artifact(res.artifact, torch.device("cpu"), torch.float32), ids)
    # Quantization moves the logits far beyond the agreement asked of the two loaders.
    assert mean_kl(ref, ours) > 100 * max(mean_kl(ours, theirs), 1e-9)
    assert mean_kl(ours, theirs) < 1e-4
