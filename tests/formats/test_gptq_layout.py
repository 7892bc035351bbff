"""GPTQ v1 layout: tensor names, shapes, the zero-1 convention and exact read-back."""
from __future__ import annotations

import pytest
import torch

from compress.formats import gptq
from compress.formats.pack import unpack
from compress.formats.qweight import QuantizedWeight
from compress.quantizers.base import QuantSpec
from compress.quantizers.rtn import round_to_nearest as quantize_weight


def rtn(out_f: int, in_f: int, bits: int, group_size: int, sym: bool = True, seed: int = 0) -> QuantizedWeight:
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    return quantize_weight(W, QuantSpec(bits=bits, group_size=group_size, sym=sym))


def permuted(qw: QuantizedWeight, seed: int = 0) -> QuantizedWeight:
    """Shuffle columns (with their group ids) as act-order quantization would leave them."""
    perm = torch.randperm(qw.shape[1], generator=torch.Generator().manual_seed(seed))
    return QuantizedWeight(
        codes=qw.codes[:, perm], scales=qw.scales, zeros=qw.zeros, g_idx=qw.g_idx[perm],
        bits=qw.bits, group_size=qw.group_size, sym=qw.sym, desc_act=True,
    )


@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, -1), (3, 128), (2, 64), (8, 32)])
def test_layout_shapes_and_dtypes(bits: int, group_size: int) -> None:
    qw = rtn(64, 256, bits, group_size)
    t = gptq.linear_tensors("m.q", qw, torch.randn(64))
    G = 1 if group_size == -1 else 256 // group_size
    assert t["m.q.qweight"].shape == (256 * bits // 32, 64) and t["m.q.qweight"].dtype == torch.int32
    assert t["m.q.qzeros"].shape == (G, 64 * bits // 32) and t["m.q.qzeros"].dtype == torch.int32
    assert t["m.q.scales"].shape == (G, 64) and t["m.q.scales"].dtype == torch.float16
    assert t["m.q.g_idx"].dtype == torch.int32 and t["m.q.bias"].dtype == torch.float16
    # v1 convention: the file holds zero - 1 (sym: 2**(bits-1) - 1 everywhere).
    stored = unpack(t["m.q.qzeros"], bits, dim=1)
    assert torch.all(stored == (1 << (bits - 1)) - 1)


def test_qweight_packs_codes_along_input_dim() -> None:
    qw = rtn(32, 64, 4, 32)
    q = gptq.linear_tensors("l", qw)["l.qweight"]
    # word [i, j] holds codes[j, 8i .. 8i+7], lowest nibble first (AutoGPTQ pack loop)
    word = int(q[1, 5]) & 0xFFFFFFFF
    expect = sum(int(qw.codes[5, 8 + k]) << (4 * k) for k in range(8))
    assert word == expect


@pytest.mark.parametrize("bits,group_size,sym,desc", [
    (4, 128, True, False), (4, -1, True, False), (3, 128, True, False),
    (4, 64, False, False), (8, 128, False, False), (4, 128, True, True), (3, 64, True, True),
])
def test_round_trip_is_exact_up_to_fp16_scales(bits: int, group_size: int, sym: bool, desc: bool) -> None:
    qw = rtn(96, 256, bits, group_size, sym)
    if not sym:  # v1 cannot hold a zero point of 0; such groups are refused (tested below)
        qw = QuantizedWeight(qw.codes, qw.scales, qw.zeros.clamp(min=1), qw.g_idx,
                             qw.bits, qw.group_size, qw.sym)
    if desc:
        qw = permuted(qw)
    bias = torch.randn(96)
    t = gptq.linear_tensors("x", qw, bias)
    back, b2 = gptq.read_linear(t, "x", bits, group_size, sym)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.g_idx, qw.g_idx)
    assert back.desc_act == desc
    assert torch.equal(back.scales, qw.scales.half().float())
    assert torch.equal(b2, bias.half())
    # A getter works as well as a dict (safetensors safe_open().get_tensor style).
    back2, _ = gptq.read_linear(lambda k: t.get(k), "x", bits, group_size, sym)
    assert torch.equal(back2.dequantize(), back.dequantize())


def test_refuses_zero_point_zero_and_unflagged_permutation() -> None:
    qw = rtn(32, 128, 4, 128, sym=False)
    zeros = qw.zeros.clone()
    zeros[3, 0] = 0
    bad = QuantizedWeight(qw.codes, qw.scales, zeros, qw.g_idx, 4, 128, False)
    with pytest.raises(ValueError, match="layer.3.*zero point of 0"):
        gptq.linear_tensors("layer.3", bad)
    p = permuted(rtn(32, 256, 4, 128))
    unflagged = QuantizedWeight(p.codes, p.scales, p.zeros, p.g_idx, 4, 128, True, desc_act=False)
    with pytest.raises(ValueError, match="desc_act"):
        gptq.linear_tensors("l", unflagged)


def test_refuses_bad_shapes_and_scales() -> None:
    with pytest.raises(ValueError, match="l: shape"):
        gptq.linear_tensors("l", rtn(16, 128, 3, 128))  # 3-bit needs out % 32 == 0
    qw = rtn(32, 128, 4, 128)
    s = qw.scales.clone()
    s[0, 0] = float("nan")
    with pytest.raises(ValueError, match="l.scales"):
        gptq.linear_tensors("l", QuantizedWeight(qw.codes, s, qw.zeros, qw.g_idx, 4, 128, True))
    s = qw.scales.clone()
    s[1, 0] = 1e-9
    with pytest.raises(ValueError, match="underflows"):
        gptq.linear_tensors("l", QuantizedWeight(qw.codes, s, qw.zeros, qw.g_idx, 4, 128, True))
    with pytest.raises(KeyError, match="l.g_idx"):
        t = gptq.linear_tensors("l", qw)
        del t["l.g_idx"]
        gptq.read_linear(t, "l", 4, 128, True)


def test_quantization_config() -> None:
    cfg = gptq.quantization_config(
        4, 128, True, True, modules_to_not_convert=["model.layers.0.mlp.down_proj"],
        dynamic={"+:.*v_proj": {"bits": 8}},
    )
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq"
    assert cfg["bits"] == 4 and cfg["group_size"] == 128 and cfg["desc_act"] is True
    assert cfg["dynamic"] == {
        "+:.*v_proj": {"bits": 8}, r"-:^model\.layers\.0\.mlp\.down_proj$": {}
    }
    with pytest.raises(ValueError, match="quantize.bits"):
        gptq.quantization_config(5, 128, True, False)
    with pytest.raises(ValueError, match="dynamic"):
        gptq.quantization_config(4, 128, True, False, dynamic={"+:(": {}})


def test_asymmetric_files_carry_the_v2_era_tag_gptqmodel_reads() -> None:
    ours = {"quantizer": ["compress:1.0"]}
    assert gptq.quantization_config(4, 64, True, False, meta=ours)["meta"] == ours
    asym = gptq.quantization_config(4, 64, False, False, meta=ours)["meta"]["quantizer"]
    assert asym == ["compress:1.0", gptq.V2_ERA_TAG]
    # an asymmetric per-layer override is enough, and an existing gptqmodel tag is kept as is
    mixed = gptq.quantization_config(4, 64, True, False, meta=ours, dynamic={"+:.*down": {"sym": False}})
    assert mixed["meta"]["quantizer"] == ["compress:1.0", gptq.V2_ERA_TAG]
    theirs = gptq.quantization_config(4, 64, False, False, meta={"quantizer": "gptqmodel:7.6.0"})
    assert theirs["meta"]["quantizer"] == ["gptqmodel:7.6.0"]
    assert ours == {"quantizer": ["compress:1.0"]}  # the caller's dict is not changed
