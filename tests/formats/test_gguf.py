"""GGUF export: exact block encodings against gguf-py's dequantization, the llama Q/K row order,
the whole file through transformers' GGUF loader (logits equal to our torch view of the same
codes), the tokenizer through the GGUF, and configs the format cannot hold (exit 2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from compress.config import ConfigError, parse_config  # noqa: E402
from compress.formats import gguf_blocks as gb  # noqa: E402
from compress.formats.artifact import open_artifact  # noqa: E402
from compress.formats.gguf_meta import Names  # noqa: E402
from compress.formats.qweight import QuantizedWeight  # noqa: E402
from compress.formats.writer import is_complete  # noqa: E402
from compress.pipeline import preflight, run  # noqa: E402
from compress.quantizers.base import QuantSpec  # noqa: E402
from compress.quantizers.rtn import round_to_nearest  # noqa: E402
from tiny_models import family_config, make_model, run_config, save_model, transformers_logits, walk_logits  # noqa: E402

GRIDS = {"Q8_0": QuantSpec(8, 32, True), "Q4_0": QuantSpec(4, 32, True), "Q4_1": QuantSpec(4, 32, False)}


# ---- block encodings ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_blocks_round_trip_exactly_through_gguf_py(name):
    """Our bytes dequantize in gguf-py to (code - zero) * fp16(scale) (Q4_1: fp16(d)*code +
    fp16(-fp16(d)*zero)), and our torch decoder gives the same bits."""
    W = torch.randn(24, 160, generator=torch.Generator().manual_seed(len(name))) * 0.05
    qw = round_to_nearest(W, GRIDS[name])
    t = gb.TYPES[name]
    raw = gb.encode(qw, t)
    assert raw.dtype == torch.uint8 and raw.shape == (24, 160 // 32 * t.bytes)
    theirs = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[name]))
    assert torch.equal(gb.decode(raw, t), theirs)
    g = qw.g_idx.long()
    d = qw.scales.to(torch.float16).float()[:, g]
    z = qw.zeros.float()[:, g]
    codes = qw.codes.float()
    if name == "Q4_1":
        m = (-qw.scales.to(torch.float16).float() * qw.zeros.float()).to(torch.float16).float()[:, g]
        expected = d * codes + m
    else:
        expected = (codes - z) * d
    assert torch.equal(theirs, expected)
    # the stored codes themselves: gguf-py's own quantizer layout, element j low nibble, j+16 high
    if name != "Q8_0":
        nib = raw.reshape(24, -1, t.bytes)[..., t.bytes - 16:]
        assert torch.equal((nib & 15).reshape(24, -1, 16), qw.codes.reshape(24, -1, 32)[..., :16])


def test_encode_refuses_a_permuted_g_idx_and_a_foreign_grid():
    qw = round_to_nearest(torch.randn(4, 64), QuantSpec(4, 32, True))
    perm = QuantizedWeight(qw.codes, qw.scales, qw.zeros, qw.g_idx.flip(0), 4, 32, True, desc_act=True)
    with pytest.raises(ValueError, match="static_groups"):
        gb.encode(perm, gb.TYPES["Q4_0"])
    with pytest.raises(ValueError, match="not Q4_1's"):
        gb.encode(qw, gb.TYPES["Q4_1"])
    assert gb.type_for(4, 64, True) is None and gb.type_for(8, 32, False) is None


def test_llama_qk_rows_follow_convert_hf_to_gguf():
    """The permutation of llama.cpp's LlamaModel.permute, written out as its reshape here."""
    cfg = family_config("llama")
    names = Names(cfg)
    q = torch.arange(128 * 3).reshape(128, 3)
    heads = cfg.num_attention_heads
    ref = q.reshape(heads, 2, 128 // heads // 2, 3).swapaxes(1, 2).reshape(128, 3)
    assert torch.equal(q[names.row_order("model.layers.0.self_attn.q_proj.weight", 128)], ref)
    k = torch.arange(64)
    kv = cfg.num_key_value_heads
    assert torch.equal(k[names.row_order("model.layers.0.self_attn.k_proj.weight", 64)],
                       k.reshape(kv, 2, 64 // kv // 2).swapaxes(1, 2).reshape(64))
    assert names.row_order("model.layers.0.self_attn.v_proj.weight", 64) is None
    assert Names(family_config("qwen2")).row_order("model.layers.0.self_attn.q_proj.weight", 128) is None
    assert names.gguf("model.layers.1.mlp.down_proj.weight") == "blk.1.ffn_down.weight"


# ---- the file through transformers' GGUF loader ---------------------------------------------
def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


# token_embd / output as llama-quantize types them on rows of 128 (hidden): an untied token_embd
# in the file's type; output Q6_K, which falls back to Q8_0 (128 % 256); a tied one Q8_0 likewise
CASES = [
    ("llama", "Q4_0", {"method": "rtn", "bits": 4, "group_size": 32}),
    ("llama", "Q4_1", {"method": "gptq", "bits": 4, "group_size": 32, "sym": False, "skip": [r"layers\.0\.self_attn\.q_proj"]}),
    ("qwen2", "Q8_0", {"method": "rtn", "bits": 8, "group_size": 32}),
    ("mistral", "Q8_0", {"method": "rtn", "bits": 8, "group_size": 32}),
    ("qwen3", "Q4_0", {"method": "rtn", "bits": 4, "group_size": 32,
                       "overrides": [{"pattern": r"mlp\.down_proj", "bits": 8}]}),
]


@pytest.mark.parametrize("family,gguf_type,quantize", CASES,
                         ids=["llama-q4_0", "llama-q4_1-gptq-skip-q", "qwen2-q8_0", "mistral-q8_0", "qwen3-q4_0-down-q8_0"])
def test_transformers_gguf_loader_gives_our_logits(family, gguf_type, quantize, tiny_tokenizer, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    # transformers' GGUF loader ignores qwen3.attention.key_length and takes Qwen3Config's head_dim
    # default (128, the real models'); llama.cpp reads the key we write
    kw = {"head_dim": 128} if family == "qwen3" else {}
    src = save_model(make_model(family, seed=3, tie_word_embeddings=family == "qwen2", **kw), tmp_path / "src",
                     tiny_tokenizer)
    cfg = parse_config(run_config(src, text_file, tmp_path / "out", evaluate={"enabled": False}, quantize=quantize,
                                  export={"format": "gguf", "gguf_type": gguf_type}))
    ctx = run(cfg)
    (res,) = ctx.candidates.values()
    assert res.error is None and is_complete(res.artifact, check_hashes=True)
    assert sorted(p.name for p in res.artifact.iterdir()) == [
        "compress-manifest.json", "compress-results.json", "config.json", "model.gguf"]
    reader = gguf.GGUFReader(str(res.artifact / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.attn_k.weight"] == gguf_type
    assert types["token_embd.weight"] == ("Q8_0" if family == "qwen2" else gguf_type)
    assert types["blk.0.attn_norm.weight"] == "F32" and types.get("output.weight") == (None if family == "qwen2" else "Q8_0")
    if "skip" in quantize:
        assert types["blk.0.attn_q.weight"] == "F16"
    if "overrides" in quantize:
        assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert reader.fields["general.quantized_by"].contents() == "compress"

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    theirs = transformers_logits(res.artifact, ids, gguf_file="model.gguf")
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        ref = torch.cat([original(ids[w : w + 1]).logits for w in range(2)])
    ours = walk_logits(open_artifact(res.artifact, torch.device("cpu"), torch.float32, dense=True), ids)
    # the same float weights on both sides: only summation order differs
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert mean_kl(ref, ours) > 100 * max(mean_kl(ours, theirs), 1e-12)
    if gguf_type == "Q8_0":  # near the original: the llama Q/K rows came back in their order
        assert mean_kl(ref, ours) < 1e-3


# ---- token_embd and output: the types llama-quantize gives them ---------------------------------
# Written out by hand from llama-quant.cpp (llama_tensor_get_type_impl: output, or token_embd when
# tied, takes Q8_0 if its rows are not a multiple of the ftype's block, else Q6_K unless the ftype
# is Q8_0; an untied token_embd keeps the ftype's type; then tensor_type_fallback: Q6_K -> Q8_0
# on rows not a multiple of 256, a 32-block type -> F16 on rows not a multiple of 32).
@pytest.mark.parametrize("ftype,cols,tied,embd,output", [
    ("Q4_0", 576, True, "Q8_0", None),  # SmolLM2-135M: Q6_K falls back to Q8_0 (llama-quantize's log says so)
    ("Q4_1", 576, True, "Q8_0", None),
    ("Q8_0", 576, True, "Q8_0", None),
    ("Q4_0", 512, True, "Q6_K", None),
    ("Q8_0", 512, True, "Q8_0", None),
    ("Q4_0", 512, False, "Q4_0", "Q6_K"),
    ("Q4_1", 512, False, "Q4_1", "Q6_K"),
    ("Q8_0", 512, False, "Q8_0", "Q8_0"),
    ("Q4_0", 576, False, "Q4_0", "Q8_0"),
    ("Q4_0", 100, False, "F16", "F16"),  # not even a 32-block fits
])
def test_simple_types_give_embedding_and_output_llama_quantize_types(ftype, cols, tied, embd, output):
    from compress.formats import gguf_mix

    ts = [("token_embd.weight", cols), ("blk.0.attn_q.weight", cols)] + ([] if tied else [("output.weight", cols)])
    t = gguf_mix.assign(ftype, ts, tied=tied)
    assert t["token_embd.weight"] == embd and t.get("output.weight") == output


def _export(src, text_file, out, gguf_type, quantize, **export):
    cfg = parse_config(run_config(src, text_file, out, evaluate={"enabled": False}, quantize=quantize,
                                  export={"format": "gguf", "gguf_type": gguf_type, **export}))
    (res,) = run(cfg).candidates.values()
    assert res.error is None and is_complete(res.artifact, check_hashes=True)
    return res, {t.name: t for t in gguf.GGUFReader(str(res.artifact / "model.gguf")).tensors}


def test_tied_embedding_of_rows_of_256_is_q6_k_and_transformers_agrees(tiny_tokenizer, text_file, tmp_path):
    """A Q4_0 file of a tied model with rows of 256: token_embd in Q6_K (a k-quant in a simple
    type's file, as llama-quantize writes it), rounded to nearest from the original, and
    transformers' GGUF loader gives our torch view's logits."""
    model = make_model("llama", seed=4, hidden_size=256, head_dim=32, tie_word_embeddings=True)
    src = save_model(model, tmp_path / "src", tiny_tokenizer)
    res, t = _export(src, text_file, tmp_path / "out", "Q4_0", {"bits": 4, "group_size": 32})
    assert t["token_embd.weight"].tensor_type.name == "Q6_K" and "output.weight" not in t
    # Q6_K: 210 bytes per 256 weights (ggml-common.h block_q6_K)
    assert t["token_embd.weight"].n_bytes == 512 * 256 // 256 * 210
    E = model.get_input_embeddings().weight.detach()
    got = torch.from_numpy(gguf.quants.dequantize(t["token_embd.weight"].data, gguf.GGMLQuantizationType.Q6_K))
    rel = float((got - E).norm() / E.norm())
    assert 1e-4 < rel < 0.05, rel  # rounded (not stored in float), on a 6-bit grid

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    theirs = transformers_logits(res.artifact, ids, gguf_file="model.gguf")
    ours = walk_logits(open_artifact(res.artifact, torch.device("cpu"), torch.float32, dense=True), ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_gguf_embedding_float_keeps_them_in_export_dtype(model_dir, text_file, tmp_path):
    """`export.gguf_embedding: float` stores token_embd and output as before (fp16 of the
    original); the default rounds them to llama-quantize's types, which makes a smaller file
    whose linears are the same bytes."""
    from transformers import AutoModelForCausalLM

    src = model_dir("llama")
    q = {"bits": 8, "group_size": 32}
    res_f, flt = _export(src, text_file, tmp_path / "f", "Q8_0", q, gguf_embedding="float")
    res_a, auto = _export(src, text_file, tmp_path / "a", "Q8_0", q)
    assert flt["token_embd.weight"].tensor_type.name == flt["output.weight"].tensor_type.name == "F16"
    assert auto["token_embd.weight"].tensor_type.name == auto["output.weight"].tensor_type.name == "Q8_0"
    original = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    for name, w in (("token_embd.weight", original.get_input_embeddings().weight),
                    ("output.weight", original.get_output_embeddings().weight)):
        assert torch.equal(torch.from_numpy(flt[name].data.copy()), w.detach().to(torch.float16))
        got = torch.from_numpy(gguf.quants.dequantize(auto[name].data, gguf.GGMLQuantizationType.Q8_0))
        assert 0 < float((got - w.detach()).abs().max()) <= float(w.detach().abs().max()) / 127
    for name in flt:
        if name.startswith("blk."):
            assert np.array_equal(flt[name].data, auto[name].data), name
    size = lambda r: (r.artifact / "model.gguf").stat().st_size  # noqa: E731
    emb_bytes = 2 * 512 * 128 * (2 - 34 / 32)  # two [512, 128] tensors: F16 -> Q8_0
    assert size(res_f) - size(res_a) == pytest.approx(emb_bytes, abs=2 * 32)
    with pytest.raises(ConfigError, match=r"export\.gguf_embedding: Value error, applies to export.format: gguf only"):
        parse_config(run_config(src, text_file, tmp_path, export={"gguf_embedding": "float"}))


def _llama_quantize():
    import os
    import shutil

    for d in (os.environ.get("LLAMACPP_DIR"), Path.home() / ".cache/compress/llama.cpp"):
        if d and (Path(d) / "build/bin/llama-quantize").is_file():
            return Path(d) / "build/bin/llama-quantize"
    return shutil.which("llama-quantize")


@pytest.mark.ecosystem
@pytest.mark.parametrize("family,dims,gguf_type,quantize", [
    ("llama", {}, "Q4_0", {"bits": 4, "group_size": 32}),
    ("llama", {}, "Q4_1", {"bits": 4, "group_size": 32, "sym": False}),
    ("qwen2", {"tie_word_embeddings": True}, "Q8_0", {"bits": 8, "group_size": 32}),
    ("llama", {"tie_word_embeddings": True, "hidden_size": 256, "head_dim": 32}, "Q4_0", {"bits": 4, "group_size": 32}),
], ids=["llama-q4_0", "llama-q4_1", "qwen2-tied-q8_0", "llama-tied-256-q4_0"])
def test_layout_and_size_are_llama_quantizes(family, dims, gguf_type, quantize, tiny_tokenizer, text_file, tmp_path):
    """llama-quantize (LLAMACPP_DIR/build/bin, scripts/build-llamacpp.sh) of our file with a float
    embedding gives every tensor the type and byte size of our own export of that type."""
    import subprocess

    tool = _llama_quantize()
    if tool is None:
        pytest.skip("llama-quantize not found (set LLAMACPP_DIR; bash scripts/build-llamacpp.sh)")
    src = save_model(make_model(family, seed=6, **dims), tmp_path / "src", tiny_tokenizer)
    res_f, _ = _export(src, text_file, tmp_path / "f", "Q8_0", {"bits": 8, "group_size": 32},
                       gguf_embedding="float", dtype="float32")
    theirs = tmp_path / "theirs.gguf"
    proc = subprocess.run([str(tool), "--allow-requantize", str(res_f.artifact / "model.gguf"), str(theirs), gguf_type, "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, ours = _export(src, text_file, tmp_path / "o", gguf_type, quantize)
    layout = lambda ts: {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in ts}  # noqa: E731
    assert layout(ours.values()) == layout(gguf.GGUFReader(str(theirs)).tensors)


def test_tokenizer_round_trips_through_the_gguf(model_dir, tiny_tokenizer, text_file, tmp_path):
    from transformers import AutoTokenizer

    cfg = parse_config(run_config(model_dir("llama"), text_file, tmp_path / "out", evaluate={"enabled": False},
                                  quantize={"bits": 8, "group_size": 32}, export={"format": "gguf", "gguf_type": "Q8_0"}))
    (res,) = run(cfg).candidates.values()
    alone = tmp_path / "alone"  # only the GGUF: nothing else in the folder can supply the tokenizer
    alone.mkdir()
    (alone / "model.gguf").symlink_to(res.artifact / "model.gguf")
    tok = AutoTokenizer.from_pretrained(str(alone), gguf_file="model.gguf")
    probe = "The river was founded in the north, and the queen became known as the modern king."
    assert tok(probe)["input_ids"] == tiny_tokenizer(probe)["input_ids"]
    assert tok.decode(tiny_tokenizer(probe)["input_ids"]) == probe
    reader = gguf.GGUFReader(str(alone / "model.gguf"))
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # llama.cpp's name
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 512 and tokens[-1] == "[PAD511]"
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tiny_tokenizer.eos_token_id


# ---- configs the format cannot hold ---------------------------------------------------------
@pytest.mark.parametrize("quantize,gguf_type,message", [
    ({"bits": 4, "group_size": 64}, "Q4_0", "quantize.group_size: gguf Q4_0 needs group_size 32, got 64"),
    ({"bits": 4, "group_size": 32, "sym": True}, "Q4_1", "quantize.sym: gguf Q4_1 needs sym false"),
    ({"bits": 4, "group_size": 32}, "Q8_0", "quantize.bits: gguf Q8_0 needs bits 8, got 4"),
    ({"method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "static_groups": False}, "Q4_0",
     "quantize.static_groups: gguf blocks are 32 consecutive columns"),
    ({"bits": 4, "group_size": 32, "sym": False, "target": {"max_bytes": 10**6},
      "target_options": {"group_sizes": [64]}}, "Q4_K",
     "quantize.target_options.group_sizes: under export.gguf_type Q4_K each option's GGUF type sets"),
])
def test_preflight_names_the_key(quantize, gguf_type, message, model_dir, text_file, tmp_path):
    cfg = parse_config(run_config(model_dir("llama"), text_file, tmp_path / "out", quantize=quantize,
                                  export={"format": "gguf", "gguf_type": gguf_type}))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        preflight(cfg, tmp_path / "out")


def test_gguf_type_is_required_and_only_for_gguf(model_dir, text_file, tmp_path):
    with pytest.raises(ConfigError, match=r"export\.gguf_type: Value error, required with export.format: gguf"):
        parse_config(run_config(model_dir("llama"), text_file, tmp_path, export={"format": "gguf"}))
    with pytest.raises(ConfigError, match=r"export\.gguf_type: Value error, applies to export.format: gguf only"):
        parse_config(run_config(model_dir("llama"), text_file, tmp_path, export={"gguf_type": "Q4_0"}))
    with pytest.raises(ConfigError, match=r"export\.gguf_type: Input should be"):
        parse_config(run_config(model_dir("llama"), text_file, tmp_path, export={"format": "gguf", "gguf_type": "IQ2_XS"}))


def test_family_without_a_mapping_exits_2(model_dir, text_file, tmp_path):
    from click.testing import CliRunner

    from compress.cli import main

    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(run_config(model_dir("gemma"), text_file, tmp_path / "out",
                                             quantize={"bits": 4, "group_size": 32},
                                             export={"format": "gguf", "gguf_type": "Q4_0"})))
    res = CliRunner().invoke(main, ["run", str(cfg)])
    assert res.exit_code == 2, res.output
    assert "export.format: gguf: model_type 'gemma' has no GGUF mapping yet" in res.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*/model.gguf"))


# ---- the writer ------------------------------------------------------------------------------
def _writer(tmp_path):
    from compress.formats.gguf_writer import GGUFArtifactWriter

    return GGUFArtifactWriter(tmp_path / "art", arch="llama", names=lambda n, rows: (n, None),
                              metadata=lambda w: None, float_dtype=torch.float16)


def test_writer_is_atomic_and_refuses_nan(tmp_path):
    w = _writer(tmp_path)
    w.add_tensors({"a.weight": torch.ones(4, 32)})
    with pytest.raises(ValueError, match="NaN or Inf"):
        w.add_tensors({"b.weight": torch.full((4, 32), float("nan"))})
    assert any(tmp_path.glob(".art.partial-*")) and not (tmp_path / "art").exists()
    w.abort()  # what the exporter does on any error: nothing is left behind
    assert not any(tmp_path.iterdir())
    w = _writer(tmp_path)
    w.add_tensor_chunks("emb.weight", torch.float32, (5, 32), [torch.ones(3, 32), torch.zeros(2, 32)])
    w.add_tensors({"norm.weight": torch.arange(3.0)})
    assert not (tmp_path / "art").exists()  # nothing at the final path until finish
    w.finish({"model_type": "llama"}, {})
    reader = gguf.GGUFReader(str(tmp_path / "art" / "model.gguf"))
    t = {x.name: x for x in reader.tensors}
    assert t["emb.weight"].tensor_type.name == "F16" and t["norm.weight"].tensor_type.name == "F32"
    assert t["emb.weight"].data.tolist() == [[1.0] * 32] * 3 + [[0.0] * 32] * 2
    assert t["norm.weight"].data.tolist() == [0.0, 1.0, 2.0]
    assert all(x.data_offset % 32 == 0 for x in reader.tensors)
    assert is_complete(tmp_path / "art", check_hashes=True)


def test_a_gguf_source_keeps_its_tokenizer_fields(model_dir, text_file, tmp_path):
    """Export, then export again from that GGUF (converted by transformers): the second file
    carries the first one's tokenizer.ggml.* fields as they were."""
    first = parse_config(run_config(model_dir("llama"), text_file, tmp_path / "a", evaluate={"enabled": False},
                                    quantize={"bits": 8, "group_size": 32}, export={"format": "gguf", "gguf_type": "Q8_0"}))
    (res,) = run(first).candidates.values()
    src = res.artifact / "model.gguf"
    again = run_config(res.artifact, text_file, tmp_path / "b", evaluate={"enabled": False},
                       quantize={"bits": 4, "group_size": 32, "sym": False}, export={"format": "gguf", "gguf_type": "Q4_1"})
    again["model"].update(gguf_file="model.gguf", cache_dir=str(tmp_path / "cache"))
    (res2,) = run(parse_config(again)).candidates.values()
    f1 = gguf.GGUFReader(str(src)).fields
    f2 = gguf.GGUFReader(str(res2.artifact / "model.gguf")).fields
    keys = sorted(k for k in f1 if k.startswith("tokenizer."))
    assert keys == sorted(k for k in f2 if k.startswith("tokenizer.")) and "tokenizer.ggml.merges" in keys
    assert all(f1[k].contents() == f2[k].contents() for k in keys)


# ---- byte budgets ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 128), (96, 256)])
@pytest.mark.parametrize("bits,sym", [(8, True), (4, True), (4, False)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_bytes_equal_the_written_blocks(shape, bits, sym, bias):
    from compress.formats.gguf import TYPE_SUFFIX
    from compress.formats.registry import QuantizedLinear, get_format

    spec = QuantSpec(bits, 32, sym)
    zero = 1 << (bits - 1) if sym else 1
    qw = QuantizedWeight(codes=torch.zeros(shape, dtype=torch.uint8), scales=torch.ones(shape[0], shape[1] // 32),
                         zeros=torch.full((shape[0], shape[1] // 32), zero, dtype=torch.uint8),
                         g_idx=torch.arange(shape[1], dtype=torch.int32) // 32, bits=bits, group_size=32, sym=sym)
    lin = QuantizedLinear("x", qw, spec.grid, torch.zeros(shape[0]) if bias else None)
    f = get_format("gguf")
    # the type tag names the tensor's GGML type in the header; it is not data
    written = {k: t for k, t in f.linear_tensors(lin, torch.float16).items() if not k.endswith(TYPE_SUFFIX)}
    assert f.linear_bytes(shape, spec, bias, torch.float16) == sum(t.numel() * t.element_size() for t in written.values())


@pytest.mark.parametrize("family,tied,dtype,extra,dims", [
    ("llama", True, "float16", 12_000, {}),  # token_embd in llama-quantize's type; a float head may become Q8_0/Q4_0
    ("qwen2", False, "float32", 40_000, {}),  # q/k/v biases and norms F32, the untied output rounded too
    ("llama", True, "float16", 40_000, {"hidden_size": 256, "head_dim": 32}),  # rows of 256: a Q6_K table
])
def test_a_byte_budget_counts_the_gguf_file_exactly(family, tied, dtype, extra, dims, tiny_tokenizer, text_file, tmp_path):
    """`quantize.target: max_bytes` under a simple gguf_type: the bytes model counts token_embd and
    output in the types the writer rounds them to, and norms and biases in F32, so the achieved
    bytes are the file's tensor bytes; each linear's GGUF type is the one allocated to it."""
    from compress.serving import safetensors_tensor_bytes

    src = save_model(make_model(family, seed=7, tie_word_embeddings=tied, **dims), tmp_path / "src", tiny_tokenizer)
    q = {"bits": 4, "group_size": 32, "sym": True}
    base = run_config(src, text_file, tmp_path / "u", evaluate={"enabled": False}, quantize=q,
                      export={"format": "gguf", "gguf_type": "Q4_0", "dtype": dtype})
    (uniform,) = run(parse_config(base)).candidates.values()
    budget = safetensors_tensor_bytes(uniform.artifact) + extra
    cfg = dict(base, quantize={**q, "target": {"max_bytes": budget}},
               export={**base["export"], "output_dir": str(tmp_path / "mixed")})
    ctx = run(parse_config(cfg))
    (res,) = ctx.candidates.values()
    assert res.error is None and is_complete(res.artifact, check_hashes=True)
    assert res.allocation["achieved_bytes"] == safetensors_tensor_bytes(res.artifact) <= budget
    want = {l["name"]: gb.type_for(l["bits"], l["group_size"], l["sym"]).name
            for l in res.allocation["layers"] if l["bits"] is not None}
    assert len(set(want.values())) > 1  # a mixed allocation, or this test shows nothing
    reader = gguf.GGUFReader(str(res.artifact / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    names = Names(family_config(family, **dims))
    assert {n: types[names.gguf(n + ".weight")] for n in want} == want
    outer = res.allocation["outer"]  # the table as the writer rounds it, recorded as such
    assert outer["embedding"]["bits"] is None and outer["embedding"]["format_type"] == types["token_embd.weight"]
    # and predicted so: the KL with the table rounded on that type's grid, not a float table's 0
    assert outer["predicted_loss"] > 0
    assert f"KL {types['token_embd.weight']}" in ctx.sensitivity["model.embed_tokens"]
    assert types["token_embd.weight"] == ("Q6_K" if dims else "Q8_0" if tied else "Q4_0")
    report = (tmp_path / "mixed" / "report.md").read_text()
    assert f"embedding {types['token_embd.weight']} (the format's own rounding)" in report


@pytest.mark.parametrize("gguf_type,dims", [
    ("Q4_K_M", {}),  # rows of 128 take llama-quantize's fallbacks (Q4_0, Q5_0, Q5_1, Q8_0), ffn_down's 256 k-quants
    ("Q4_K", {"hidden_size": 256, "head_dim": 32, "intermediate_size": 512}),  # every row a k-quant's
])
def test_a_byte_budget_chooses_k_quant_types(gguf_type, dims, tiny_tokenizer, text_file, tmp_path):
    """`quantize.target` under a k-quant gguf_type: each linear's option is a GGUF type (bits 2..6, 8:
    Q2_K..Q6_K, Q8_0, or the fallback its row length takes), at the bytes of llama-quantize's mix the
    allocation stays within them, the achieved bytes are the file's and each tensor holds its type."""
    from compress.formats import gguf_mix as gx
    from compress.serving import safetensors_tensor_bytes

    src = save_model(make_model("llama", seed=7, tie_word_embeddings=True, **dims), tmp_path / "src", tiny_tokenizer)
    base = run_config(src, text_file, tmp_path / "u", evaluate={"enabled": False},
                      export={"format": "gguf", "gguf_type": gguf_type})
    base["quantize"] = {"method": "rtn"}  # the types set bits, group size and symmetry
    (uniform,) = run(parse_config(base)).candidates.values()
    budget = safetensors_tensor_bytes(uniform.artifact)
    cfg = dict(base, quantize={"target": {"max_bytes": budget}},
               export={**base["export"], "output_dir": str(tmp_path / "mixed")})
    ctx = run(parse_config(cfg))
    (res,) = ctx.candidates.values()
    assert res.error is None and is_complete(res.artifact, check_hashes=True)
    assert res.allocation["achieved_bytes"] == safetensors_tensor_bytes(res.artifact) <= budget
    want = {l["name"]: l["type"] for l in res.allocation["layers"] if l["bits"] is not None}
    allowed = {gx.fallback(t, c) for t in gx.TARGET_TYPES.values() for c in (128, 256, 512)}
    assert set(want.values()) <= allowed and len(set(want.values())) > 1  # mixed, on GGUF types only
    mix = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(uniform.artifact / "model.gguf")).tensors}
    reader = gguf.GGUFReader(str(res.artifact / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    names = Names(family_config("llama", **dims))
    assert {n: types[names.gguf(n + ".weight")] for n in want} == want
    # every option is measured on its type's grid: the uniform mix's type of each linear among them
    assert all(ctx.sensitivity[n][mix[names.gguf(n + ".weight")]] > 0 for n in want)
    report = (tmp_path / "mixed" / "report.md").read_text()
    assert any(f"x {t}" in report for t in set(want.values()))
    # the allocation was measured against the mix it replaces (which fits the same bytes) and written
    # only where it measures lower; else the mix's own types are
    c = res.allocation["against_recipe"]
    assert c["recipe"]["bytes"] <= res.allocation["budget_bytes"]
    kept = min(("allocation", "recipe"), key=lambda k: c[k]["joint_rtn_kl"])
    assert c["kept"] == kept and f"the {kept} is written" in report
    if kept == "recipe":
        assert want == {n: mix[names.gguf(n + ".weight")] for n in want}
    # block_kl's reference: each layer at the type the plan gives it (Q4_K_M raises attn_v of block 1;
    # o_proj's rows of 128 take Q4_K's fallback Q5_0)
    assert "at the plan's own option per layer (" + ("Q4_K, Q5_0, Q6_K, Q8_0)" if gguf_type == "Q4_K_M"
                                                     else "Q4_K, Q5_0)") in res.allocation["predictor"]


def test_target_options_under_a_k_quant_are_gguf_types_with_llama_quantizes_fallbacks():
    from compress.formats.registry import get_format
    from compress.mixed.plan import option_grid
    from compress.quantizers.rtn import RTNConfig

    f = get_format("gguf")
    export = parse_config({"model": {"source": "x"}, "export": {"format": "gguf", "gguf_type": "Q4_K_M"}}).export
    grid = option_grid(RTNConfig(), f, export)
    assert [s and s.bits for s in grid] == [2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 8, 8, None]  # x (group, -1): one type

    def types(cols):
        return [s.gguf_grid for s in (f.target_spec(s, (64, cols), export) for s in grid if s) if s]

    assert set(types(1536)) == {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"}
    assert set(types(576)) == {"Q4_0", "Q5_0", "Q5_1", "Q8_0"}  # rows of 576: llama-quantize's fallbacks
    assert f.linear_bytes((64, 1536), f.target_spec(grid[4], (64, 1536), export), True, torch.float16) == \
        64 * (1536 // 256 * 144 + 4)  # Q4_K: 144 bytes a block of 256, the bias F32
    simple = parse_config({"model": {"source": "x"}, "export": {"format": "gguf", "gguf_type": "Q4_0"}}).export
    assert f.target_bits(simple) == [2, 3, 4, 8] and f.target_spec(grid[4], (64, 576), simple) is grid[4]
