"""AWQ GEMM layout: AutoAWQ's interleaved packing against a slow packer written here, exact
round trips, raw zero points, preflight limits naming the key, and a pipeline artifact that
our loader reads back to the same logits as the same plan written as compressed-tensors."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from compress.config import ConfigError, parse_config
from compress.formats import awq
from compress.formats.artifact import open_artifact
from compress.formats.registry import LayerScheme, get_format
from compress.formats.writer import is_complete
from compress.pipeline import run
from compress.quantizers.base import QuantSpec
from compress.quantizers.gptq import GPTQSpec
from compress.quantizers.rtn import round_to_nearest
from compress.quantizers.smoothquant import W8A8
from tiny_models import make_model, run_config, save_model, walk_logits

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order, restated here


def slow_pack(rows: list[list[int]]) -> list[list[int]]:
    """Word w of a row: nibble k holds column 8*w + ORDER[k]; as a signed int32."""
    out = []
    for row in rows:
        words = []
        for w in range(len(row) // 8):
            v = sum(row[8 * w + ORDER[k]] << (4 * k) for k in range(8))
            words.append(v - (1 << 32) if v >= 1 << 31 else v)
        out.append(words)
    return out


@pytest.mark.parametrize("group_size", [16, 64, 128])
def test_layout_matches_slow_packer_and_round_trips(group_size):
    g = torch.Generator().manual_seed(group_size)
    W = torch.randn(48, 128, generator=g)
    qw = round_to_nearest(W, QuantSpec(4, group_size, False))
    zeros = qw.zeros.clone()
    zeros[0, 0] = 0  # our grids start zero points at 1; AWQ files may hold 0 (other producers)
    qw = dataclasses.replace(qw, zeros=zeros)
    b = torch.randn(48, generator=g)
    t = awq.linear_tensors("l", qw, b)
    assert t["l.qweight"].shape == (128, 6) and t["l.qweight"].dtype == torch.int32
    assert t["l.qweight"].tolist() == slow_pack(qw.codes.t().long().tolist())
    # raw zero points, no -1 offset (GPTQ v1 stores zero - 1)
    assert t["l.qzeros"].tolist() == slow_pack(qw.zeros.t().long().tolist())
    assert t["l.scales"].dtype == torch.float16 and t["l.scales"].shape == (128 // group_size, 48)
    assert torch.equal(t["l.scales"], qw.scales.t().half())
    assert int(qw.zeros[0, 0]) == 0  # stored as is (GPTQ v1 cannot store it)
    back, bias = awq.read_linear({k[2:]: v for k, v in t.items()}, "l")
    for f in ("codes", "zeros", "g_idx"):
        assert torch.equal(getattr(back, f), getattr(qw, f)), f
    assert torch.equal(back.scales, qw.scales.half().float())
    assert (back.bits, back.group_size, back.sym) == (4, group_size, False)
    assert torch.equal(bias, b.half())


def test_one_word_by_hand():
    """Columns 0..7 holding 1..8: nibbles in order 1, 3, 5, 7, 2, 4, 6, 8 from the low end."""
    x = torch.arange(1, 9, dtype=torch.uint8).reshape(1, 8)
    assert awq.pack_columns(x).item() == 0x86427531 - (1 << 32)  # as a signed int32
    assert torch.equal(awq.unpack_columns(awq.pack_columns(x)), x)


def test_preflight_names_the_key():
    f = get_format("awq")
    ok = QuantSpec(4, 64, False)
    assert f.check("a", ok, (64, 128), conv1d=False) is None
    assert "quantize.sym: false" in f.check("a", QuantSpec(4, 64, True), (64, 128), False)
    assert "quantize.bits: 4" in f.check("a", QuantSpec(8, 64, False), (64, 128), False)
    assert "quantize.group_size" in f.check("a", QuantSpec(4, -1, False), (64, 128), False)
    assert "quantize.group_size" in f.check("a", QuantSpec(4, 256, False), (64, 256), False)
    assert "8 output columns" in f.check("a", ok, (60, 128), False)
    assert "Conv1D" in f.check("a", ok, (64, 128), True)
    assert "weight-only" in f.check("a", QuantSpec(8, -1, True, W8A8), (64, 128), False)
    assert "static_groups" in f.check("a", GPTQSpec(4, 64, False, desc_act=True), (64, 128), False)
    assert f.check_plan({"a": ok, "b": ok}) is None
    assert "'b' differs from 'a'" in f.check_plan({"a": ok, "b": QuantSpec(4, 32, False)})


def test_quantization_config_is_autoawqs():
    qc = get_format("awq").quantization_config(
        QuantSpec(4, 64, False), [LayerScheme("m.0.q", 4, 64, False, False)], ["lm_head", "m.1.q"], {})
    assert qc == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 64, "zero_point": True,
                  "modules_to_not_convert": ["lm_head", "m.1.q"]}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    model = make_model("llama", seed=11, hidden_size=256, intermediate_size=512, num_key_value_heads=4)
    return save_model(model, tmp_path_factory.mktemp("llama256-awq"), tiny_tokenizer)


# The format, not the method, is under test here (RTN keeps it fast; the ecosystem test
# exports the awq method).
PLAN = {"method": "rtn", "bits": 4, "group_size": 64, "sym": False,
            "skip": [r"layers\.1\.mlp\.down_proj"]}


def test_pipeline_artifact_reads_back_like_compressed_tensors(llama_dir, text_file, tmp_path):
    """The same plan written as AWQ GEMM and as compressed-tensors: identical codes, so
    identical logits through our loader (both store fp16 scales)."""
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    logits = {}
    for fmt in ("awq", "compressed-tensors"):
        cfg = parse_config(run_config(llama_dir, text_file, tmp_path / fmt, quantize=PLAN,
                                      export={"format": fmt}, evaluate={"enabled": fmt == "awq"}))
        (res,) = run(cfg).candidates.values()
        assert res.error is None and is_complete(res.artifact, check_hashes=True)
        logits[fmt] = walk_logits(open_artifact(res.artifact, torch.device("cpu"), torch.float32), ids)
        if fmt == "awq":
            qc = json.loads((res.artifact / "config.json").read_text())["quantization_config"]
            assert qc == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 64, "zero_point": True,
                          "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.down_proj"]}
            assert res.metrics.kl_divergence > 0
            dense = walk_logits(open_artifact(res.artifact, torch.device("cpu"), torch.float32, dense=True), ids)
            torch.testing.assert_close(dense, logits["awq"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(logits["awq"], logits["compressed-tensors"], rtol=0, atol=0)


def test_plans_awq_cannot_hold_fail_at_preflight(llama_dir, text_file, tmp_path):
    sym = parse_config(run_config(llama_dir, text_file, tmp_path / "s", quantize={"bits": 4, "group_size": 64, "sym": True},
                                  export={"format": "awq"}))
    with pytest.raises(ConfigError, match=r"export.format: awq cannot hold layer .*quantize.sym: false"):
        run(sym)
    mixed = parse_config(run_config(llama_dir, text_file, tmp_path / "m", export={"format": "awq"}, quantize={
        "sym": False, "overrides": [{"pattern": "down_proj", "group_size": 32}]}))
    with pytest.raises(ConfigError, match=r"awq cannot hold candidate .*one grid for every layer"):
        run(mixed)
