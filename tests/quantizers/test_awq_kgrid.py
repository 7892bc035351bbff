"""AWQ on GGUF's block grids (export.format: gguf with a k-quant type): the scale search scores
each candidate with the k-grid quantizer of the layer's own GGUF type, and the codes written
to the file are the quantizer's, bit for bit through gguf-py's dequantization."""
from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from compress.config import ConfigError, parse_config  # noqa: E402
from compress.formats.qweight import BlockQuantWeight  # noqa: E402
from compress.pipeline import preflight, run  # noqa: E402
from compress.quantizers import awq  # noqa: E402
from compress.quantizers.awq import AWQSpec, fake_quantize, quantize_weight  # noqa: E402
from compress.quantizers.base import LayerStats, QuantSpec  # noqa: E402
from compress.quantizers.rtn import round_to_nearest  # noqa: E402
from tiny_models import make_model, run_config, save_model  # noqa: E402


def test_fake_quantize_on_a_gguf_grid_is_rtn_on_that_grid():
    """What the search scores a candidate with: RTN's k-quant codes, dequantized as ggml does,
    not the uniform grid of the same bits and group size."""
    W = torch.randn(16, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    for name in ("Q4_K", "Q6_K", "Q5_0"):
        spec = AWQSpec(bits=4).on_gguf_grid(name)
        got = fake_quantize(W, spec)
        raw = round_to_nearest(W, spec)
        assert isinstance(raw, BlockQuantWeight) and raw.grid_name == name
        assert torch.equal(got, raw.dequantize(torch.float32))
        uniform = fake_quantize(W, QuantSpec(spec.bits, spec.group_size, spec.sym))
        assert not torch.equal(got, uniform)


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_rounding_lands_on_the_gguf_grid(rounding):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 256, generator=g) * 0.05
    X = torch.randn(512, 256, generator=g) * torch.linspace(0.1, 3, 256)
    H = 2 * X.t() @ X / X.shape[0]
    spec = AWQSpec(bits=4, rounding=rounding).on_gguf_grid("Q4_K")
    res = quantize_weight(W, LayerStats(hessian=H), spec)
    assert isinstance(res.weight, BlockQuantWeight) and res.weight.grid_name == "Q4_K"
    assert res.spec.gguf_grid == "Q4_K"
    if rounding == "rtn":
        assert torch.equal(res.weight.codes, round_to_nearest(W, spec).codes)
    with pytest.raises(ValueError, match="GGUF Q4_K chooses its own"):
        quantize_weight(W, LayerStats(hessian=H), AWQSpec(bits=4, clip=True).on_gguf_grid("Q4_K"))


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_codes_written_are_the_quantizers_and_the_search_used_the_kgrid(
        rounding, tiny_tokenizer, text_file, tmp_path, monkeypatch):
    from compress.formats.gguf_meta import Names
    from compress.stages import export as export_stage

    seen, searched = {}, []
    add_block = export_stage.Exporter.add_block

    def spy_block(self, i, block, results):
        seen.update({f"model.layers.{i}.{n}.weight": r.weight for n, r in results.items()})
        return add_block(self, i, block, results)

    real_fake = awq.fake_quantize

    def spy_fake(W, spec):
        searched.append(spec.gguf_grid)
        return real_fake(W, spec)

    monkeypatch.setattr(export_stage.Exporter, "add_block", spy_block)
    monkeypatch.setattr(awq, "fake_quantize", spy_fake)
    model = make_model("llama", seed=5, head_dim=32, hidden_size=256, intermediate_size=512)
    src = save_model(model, tmp_path / "src", tiny_tokenizer)
    raw = run_config(src, text_file, tmp_path / "out", evaluate={"enabled": False},
                     export={"format": "gguf", "gguf_type": "Q4_K_M"})
    raw["quantize"] = {"method": "awq", "grid": 4, "rounding": rounding}
    ctx = run(parse_config(raw))
    (res,) = ctx.candidates.values()
    assert res.error is None and {r.method for r in res.layers} == {"awq"}

    # the search scored candidates on the GGUF types the mix gives the balance layers (Q4_K
    # and Q6_K), never on a uniform grid
    reader = gguf.GGUFReader(str(res.artifact / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    balance = {types[f"blk.{i}.{n}.weight"] for i in range(2) for n in ("attn_q", "ffn_up", "ffn_down")}
    assert searched and None not in searched and set(searched) == balance and "Q6_K" in balance

    # every block linear in the file: gguf-py's dequantization of its bytes is the quantizer's
    # weight bit for bit (llama's q/k rows in llama.cpp's order)
    names = Names(model.config)
    by_name = {t.name: t for t in reader.tensors}
    assert len(seen) == 14
    for hf, want in seen.items():
        assert isinstance(want, BlockQuantWeight)
        t = by_name[names.gguf(hf)]
        assert t.tensor_type.name == want.grid_name
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(want.shape)
        order = names.row_order(hf, want.shape[0])
        ref = want.dequantize(torch.float32)
        assert torch.equal(got, ref if order is None else ref[order]), hf


def test_preflight_refuses_clip_and_accepts_awq(model_dir, text_file, tmp_path):
    raw = run_config(model_dir("llama"), text_file, tmp_path / "out", export={"format": "gguf", "gguf_type": "Q4_K_M"})
    raw["quantize"] = {"method": "awq", "clip": True}
    with pytest.raises(ConfigError, match=r"quantize\.clip: GGUF Q4_K_M's block grid chooses its own ranges"):
        preflight(parse_config(raw), tmp_path / "out")
    raw["quantize"] = {"method": "awq", "rounding": "gptq"}
    assert len(preflight(parse_config(raw), tmp_path / "out")) == 1
