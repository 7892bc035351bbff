"""`quantize.lm_head`: a tied model's head rounded to nearest and stored as its own quantized
tensor in every format that holds one. The head each format wrote reads back as the RTN of the
original head (independent slow reference below), our loader's logits equal the format's own
reader (transformers + compressed-tensors, transformers' GGUF loader, ONNX Runtime), and
formats that cannot hold it refuse at preflight naming `quantize.lm_head`."""
from __future__ import annotations

import json

import pytest
import torch

from compress.config import ConfigError, parse_config
from compress.formats.artifact import open_artifact
from compress.formats.writer import is_complete
from compress.pipeline import preflight, run
from tiny_models import HIDDEN, VOCAB, family_tokenizer, make_model, run_config, save_model, walk_logits

CPU = torch.device("cpu")


def rtn_reference(W: torch.Tensor, bits: int, gs: int, sym: bool, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round to nearest per (row, group) written out loop by loop, as GPTQ's reference
    `quant.py` does, with scales stored in `scale_dtype`: the weights a reader must see."""
    gs = W.shape[1] if gs == -1 else gs
    maxq = (1 << bits) - 1
    out = torch.empty_like(W)
    for c in range(0, W.shape[1], gs):
        x = W[:, c : c + gs]
        lo, hi = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = torch.where(lo < 0, -hi, lo)
        scale = (hi - lo) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
        if not sym:  # zero points start at 1 (compress.quantizers.grid)
            low = zero < 1
            scale = torch.where(low, hi / (maxq - 1), scale)
            zero = torch.where(low, torch.ones_like(zero), zero)
        q = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, maxq)
        out[:, c : c + gs] = scale.to(scale_dtype).float()[:, None] * (q - zero[:, None])
    return out


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tied llama (the SmolLM2 case): source folder and its float head [vocab, hidden]."""
    model = make_model("llama", seed=5, tie_word_embeddings=True)
    src = save_model(model, tmp_path_factory.mktemp("tied") / "src", family_tokenizer("llama"))
    return src, model.lm_head.weight.detach().clone()


def export(src, text_file, out, fmt, quantize, lm_head, calibration=None, **export_kw):
    cfg = parse_config(run_config(src, text_file, out, evaluate={"enabled": False}, calibration=calibration or {},
                                  quantize={**quantize, "lm_head": lm_head}, export={"format": fmt, **export_kw}))
    (res,) = run(cfg).candidates.values()
    assert res.error is None and is_complete(res.artifact, check_hashes=True)
    return res


@pytest.mark.parametrize("fmt,lm_head,scale_dtype", [
    ("compressed-tensors", {"bits": 8, "group_size": -1}, torch.float16),
    ("compressed-tensors", {"bits": 4, "group_size": 32, "sym": True}, torch.float16),
])
def test_head_reads_back_as_rtn_and_transformers_agrees(fmt, lm_head, scale_dtype, tied, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    src, W = tied
    res = export(src, text_file, tmp_path / "out", fmt, {"bits": 4, "group_size": 64}, lm_head)
    man = json.loads((res.artifact / "compress-manifest.json").read_text())
    head = man["quantization"]["lm_head"]
    assert head["untied_from_embedding"] is True and head["bits"] == lm_head["bits"]
    assert json.loads((res.artifact / "config.json").read_text())["tie_word_embeddings"] is False
    assert res.plan.name.endswith("-head" + str(lm_head["bits"]) + ("ch" if lm_head["group_size"] == -1 else
                                                                    "g32sym" if lm_head.get("sym") else ""))
    assert res.layers[-1].name == "lm_head" and 0 < res.layers[-1].weight_rel_error < 0.05

    sm = open_artifact(res.artifact, CPU, torch.float32, dense=True)
    ours_head = torch.cat([w for _, w, _ in sm.head_slices(100)])
    ref = rtn_reference(W, lm_head["bits"], lm_head["group_size"], bool(lm_head.get("sym", False)), scale_dtype)
    torch.testing.assert_close(ours_head, ref, rtol=0, atol=1e-6)
    # the embedding the gather reads is unchanged (fp16 of the original)
    emb = sm.model.get_input_embeddings().weight
    torch.testing.assert_close(emb.float(), W.half().float(), rtol=0, atol=0)

    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    ours = walk_logits(sm, ids)
    # transformers + compressed-tensors reads the head from its config group
    peer = AutoModelForCausalLM.from_pretrained(str(res.artifact), dtype=torch.float32, device_map="cpu").eval()
    with torch.no_grad():
        theirs = peer(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.equal(peer.lm_head.weight if hasattr(peer.lm_head, "weight") else W, W)
    # the fast CPU path (compress generate / speed) runs the quantized head through a kernel
    from compress.runtime import kernels

    model = open_artifact(res.artifact, CPU, torch.float32).materialize_all()
    used = kernels.accelerate(model, CPU)
    assert "lm_head" in used


@pytest.mark.parametrize("hidden,lm_head", [
    (HIDDEN, {"bits": 4, "group_size": 32}),  # asymmetric: zero points
    (HIDDEN, {"bits": 8, "group_size": 64, "sym": True}),  # the op's default zero point
    (192, {"bits": 8, "group_size": -1}),  # per channel on blocks of 64 (as SmolLM2's 576): no padding
    (240, {"bits": 8, "group_size": -1}),  # blocks of 128 over 240 columns: padded rows, sliced
])
def test_onnx_tied_head_is_one_matmulnbits_table_the_embedding_gathers(hidden, lm_head, text_file, tmp_path):
    """A tied model's quantized head is the only copy of the table: the embedding reads the
    head's codes (GatherBlockQuantized, as the builder's shared_embeddings), ORT's embedding
    rows and logits are the head's RTN rows, and the file holds no float table."""
    import onnx

    from compress.evaluate.onnx_runtime import OrtDecoder, head_inputs, head_slices
    from compress.formats.matmulnbits import block_size_for
    from compress.formats.onnx_format import ONNX_FILE

    model = make_model("llama", seed=5, tie_word_embeddings=True, hidden_size=hidden)
    src = save_model(model, tmp_path / "src", family_tokenizer("llama"))
    W = model.lm_head.weight.detach().clone()
    res = export(src, text_file, tmp_path / "out", "onnx", {"bits": 4, "group_size": 64 if hidden % 64 == 0 else 16},
                 lm_head, dtype="float32")
    m = onnx.load(str(res.artifact / ONNX_FILE), load_external_data=False)
    assert not [n for n in m.graph.node if n.op_type == "Gemm"]
    assert not [t for t in m.graph.initializer if t.name.startswith("model.embed_tokens")]
    (gather,) = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    assert any(n.op_type == "MatMulNBits" and n.input[1] == "lm_head.MatMulNBits.B" for n in m.graph.node)
    assert json.loads((res.artifact / "config.json").read_text())["tie_word_embeddings"] is True
    head_entry = json.loads((res.artifact / "compress-manifest.json").read_text())["quantization"]["lm_head"]
    assert head_entry["shared_with_embedding"] is True and head_entry["untied_from_embedding"] is False

    head = torch.cat([w for _, w, _ in head_slices(res.artifact, 100)])
    ref = rtn_reference(W, lm_head["bits"], lm_head["group_size"], bool(lm_head.get("sym", False)), torch.float32)
    torch.testing.assert_close(head, ref, rtol=0, atol=1e-6)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    block = block_size_for(lm_head["group_size"], hidden, lm_head["bits"])
    assert hidden % block == (112 if hidden == 240 else 0)  # 240: blocks of 128; the rest divide the row
    rows = gather.output[0] if hidden % block == 0 else next(n for n in m.graph.node if n.op_type == "Slice").output[0]
    dec = OrtDecoder(res.artifact, extra_outputs=(rows,))
    got = dec.run(ids[:1].numpy(), dec.empty_past(1), [rows])[rows]
    torch.testing.assert_close(torch.from_numpy(got)[0], ref[ids[0]], rtol=0, atol=0)
    torch.testing.assert_close(head_inputs(res.artifact, ids) @ head.T, OrtDecoder(res.artifact).logits(ids),
                               rtol=0, atol=1e-4)


def test_onnx_shared_embedding_false_keeps_the_float_table_and_unties(tied, text_file, tmp_path):
    """`export.onnx_shared_embedding: false` (the builder's shared_embeddings=false): the embedding
    stays a float32 Gather table, the head its own MatMulNBits, and config.json is untied."""
    import onnx

    from compress.evaluate.onnx_runtime import OrtDecoder, head_inputs, head_slices
    from compress.formats.onnx_format import ONNX_FILE

    src, W = tied
    res = export(src, text_file, tmp_path / "out", "onnx", {"bits": 4, "group_size": 64}, {"bits": 4, "group_size": 32},
                 dtype="float32", onnx_shared_embedding=False)
    m = onnx.load(str(res.artifact / ONNX_FILE), load_external_data=False)
    assert not [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    assert [t for t in m.graph.initializer if t.name == "model.embed_tokens.weight"]
    assert json.loads((res.artifact / "config.json").read_text())["tie_word_embeddings"] is False
    head_entry = json.loads((res.artifact / "compress-manifest.json").read_text())["quantization"]["lm_head"]
    assert head_entry["untied_from_embedding"] is True and head_entry["shared_with_embedding"] is False
    head = torch.cat([w for _, w, _ in head_slices(res.artifact, 100)])
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(head_inputs(res.artifact, ids) @ head.T, OrtDecoder(res.artifact).logits(ids),
                               rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match="export.onnx_shared_embedding: .*onnx only"):
        parse_config(run_config(src, text_file, tmp_path / "x", export={"onnx_shared_embedding": False}))


def test_gguf_output_in_the_simple_type_transformers_agrees(tied, text_file, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    src, W = tied
    res = export(src, text_file, tmp_path / "out", "gguf", {"bits": 8, "group_size": 32},
                 {"bits": 4, "group_size": 32, "sym": True}, gguf_type="Q8_0")
    reader = gguf.GGUFReader(str(res.artifact / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    # the head is its own tensor now: token_embd takes the untied rule, the file's type (llama-quantize's)
    assert types["output.weight"] == "Q4_0" and types["token_embd.weight"] == "Q8_0"
    sm = open_artifact(res.artifact, CPU, torch.float32, dense=True)
    head = torch.cat([w for _, w, _ in sm.head_slices(100)])
    torch.testing.assert_close(head, rtn_reference(W, 4, 32, True, torch.float16), rtol=0, atol=1e-6)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    peer = AutoModelForCausalLM.from_pretrained(str(res.artifact), gguf_file="model.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = torch.cat([peer(ids[w : w + 1]).logits for w in range(2)])
    torch.testing.assert_close(walk_logits(sm, ids), theirs, rtol=1e-4, atol=1e-4)


def test_default_keeps_the_head_in_float_and_tied(tied, text_file, tmp_path):
    src, _ = tied
    res = export(src, text_file, tmp_path / "out", "compressed-tensors", {"bits": 4, "group_size": 64}, None)
    cfg = json.loads((res.artifact / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["quantization_config"]["ignore"] == ["lm_head"]
    assert "lm_head" not in json.loads((res.artifact / "compress-manifest.json").read_text())["quantization"]
    assert res.plan.name == "rtn-w4-g64"


@pytest.mark.parametrize("fmt,export_kw,lm_head,message", [
    ("awq", {}, {"bits": 4}, "quantize.lm_head: export.format awq: awq artifacts keep the lm_head"),
    ("gptq", {}, {"bits": 4}, "quantize.lm_head: export.format gptq: gptq artifacts keep the lm_head in export.dtype"),
    ("gguf", {"gguf_type": "Q4_K_M"}, {"bits": 8, "group_size": 32}, "quantize.lm_head: export.format gguf: "
     "export.gguf_type Q4_K_M already stores output"),
    ("gguf", {"gguf_type": "Q8_0"}, {"bits": 8, "group_size": 64}, "quantize.lm_head: export.format gguf: "
     "the output tensor needs a simple GGUF type's grid"),
    ("onnx", {"dtype": "float32"}, {"bits": 2}, "quantize.lm_head: export.format onnx: MatMulNBits holds bits 4 or 8"),
])
def test_formats_that_cannot_hold_it_refuse_at_preflight(fmt, export_kw, lm_head, message, tied, text_file, tmp_path):
    q = {"method": "awq", "bits": 4, "group_size": 64} if fmt == "awq" else {"bits": 8, "group_size": 32}
    raw = run_config(tied[0], text_file, tmp_path / "out", export={"format": fmt, **export_kw})
    raw["quantize"] = {"lm_head": lm_head, **({} if export_kw.get("gguf_type") == "Q4_K_M" else q)}
    cfg = parse_config(raw)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        preflight(cfg, tmp_path / "out")


def test_a_group_size_that_does_not_divide_the_head_fails_before_quantizing(tied, text_file, tmp_path):
    from compress.config import ConfigError as Err

    cfg = parse_config(run_config(tied[0], text_file, tmp_path / "out",
                                  quantize={"lm_head": {"bits": 8, "group_size": 2 * HIDDEN}}))
    with pytest.raises(Err, match=r"quantize\.lm_head\.group_size: 256 does not divide"):
        run(cfg)


def test_sweep_varies_the_head(tied, text_file):
    from compress.sweep import with_sweep

    cfg = parse_config(run_config(tied[0], text_file, "/tmp/unused",
                                  sweep={"lm_head": [None, {"bits": 8, "group_size": -1}, {"bits": 4}]}))
    names = [c.name for c in with_sweep(cfg).candidates]
    assert names == ["rtn-w4-g64", "rtn-w4-g64-head8ch", "rtn-w4-g64-head4"]


@pytest.mark.parametrize("fmt,export_kw,max_bytes", [
    ("compressed-tensors", {}, 400_000),
    # the table once, as the head's codes; float32 norms and the graph's rotary tables counted
    ("onnx", {"dtype": "float32"}, 700_000),
])
def test_a_bytes_target_counts_the_quantized_head_exactly(fmt, export_kw, max_bytes, tied, text_file, tmp_path):
    """`quantize.target: max_bytes` leaves the slots what the embedding and the quantized head
    (as the format stores it) do not take: the achieved bytes are the written tensors'."""
    from compress.serving import safetensors_tensor_bytes

    res = export(tied[0], text_file, tmp_path / "out", fmt,
                 {"bits": 4, "group_size": 64, "target": {"max_bytes": max_bytes}}, {"bits": 8, "group_size": -1},
                 **export_kw)
    assert res.allocation["achieved_bytes"] == safetensors_tensor_bytes(res.artifact) <= max_bytes


# ---- rounding: gptq (the default for a calibrated method) -------------------------------------
def _output_error(x: torch.Tensor, W: torch.Tensor, Wq: torch.Tensor) -> float:
    return float(((x.reshape(-1, x.shape[-1]).double() @ (W - Wq).double().T) ** 2).sum())


@pytest.mark.parametrize("fmt,export_kw,quantize,lm_head,scale_dtype", [
    ("onnx", {"dtype": "float32"}, {"bits": 4, "group_size": 64}, {"bits": 4, "group_size": 32}, torch.float32),
    ("compressed-tensors", {}, {"bits": 4, "group_size": 64}, {"bits": 4, "group_size": 32, "sym": True},
     torch.float16),
    ("gguf", {"gguf_type": "Q8_0"}, {"bits": 8, "group_size": 32}, {"bits": 4, "group_size": 32, "sym": True},
     torch.float16),
], ids=["onnx", "compressed-tensors", "gguf"])
def test_gptq_head_beats_rtn_and_the_formats_reader_agrees(fmt, export_kw, quantize, lm_head, scale_dtype, tied,
                                                          text_file, tmp_path):
    """A GPTQ plan's head is rounded by GPTQ: the manifest says so, the head's output error on
    what the artifact's head receives is below the RTN head's, and the format's own reader
    (ONNX Runtime, transformers + compressed-tensors, transformers' GGUF loader) gives our logits."""
    from transformers import AutoModelForCausalLM

    from transformers import AutoTokenizer

    src, W = tied
    # enough calibration tokens that the head's Hessian (hidden x hidden) describes the text
    res = export(src, text_file, tmp_path / "out", fmt, {"method": "gptq", **quantize}, lm_head,
                 calibration={"nsamples": 32}, **export_kw)
    head = json.loads((res.artifact / "compress-manifest.json").read_text())["quantization"]["lm_head"]
    assert (head["rounding"], head["method"]) == ("gptq", "gptq") and 0 < head["output_rel_error"] < 0.05
    assert res.layers[-1].name == "lm_head" and res.layers[-1].method == "gptq"
    assert res.plan.name.startswith("gptq-") and "-head4" in res.plan.name and not res.plan.name.endswith("rtn")

    # windows of the calibration text (the objective's distribution), not random ids
    tok = AutoTokenizer.from_pretrained(str(src))
    ids = torch.tensor(tok(text_file.read_text())["input_ids"][-4 * 32 :]).reshape(4, 32)
    if fmt == "onnx":
        from compress.evaluate.onnx_runtime import OrtDecoder, head_inputs, head_slices

        ours_head = torch.cat([w for _, w, _ in head_slices(res.artifact, 100)])
        x = head_inputs(res.artifact, ids)
        torch.testing.assert_close(x @ ours_head.T, OrtDecoder(res.artifact).logits(ids), rtol=0, atol=1e-4)
    else:
        from compress.stages.evaluate import head_inputs as walk_head_inputs

        sm = open_artifact(res.artifact, CPU, torch.float32, dense=True)
        ours_head = torch.cat([w for _, w, _ in sm.head_slices(100)])
        kw = {"gguf_file": "model.gguf"} if fmt == "gguf" else {"device_map": "cpu"}
        peer = AutoModelForCausalLM.from_pretrained(str(res.artifact), dtype=torch.float32, **kw).eval()
        with torch.no_grad():
            theirs = torch.cat([peer(ids[w : w + 1]).logits for w in range(ids.shape[0])])
        torch.testing.assert_close(walk_logits(sm, ids), theirs, rtol=1e-4, atol=1e-4)
        x = walk_head_inputs(open_artifact(res.artifact, CPU, torch.float32, dense=True), ids, "test")
    rtn = rtn_reference(W, lm_head["bits"], lm_head["group_size"], bool(lm_head.get("sym", False)), scale_dtype)
    assert not torch.equal(ours_head, rtn)
    assert _output_error(x, W, ours_head) < _output_error(x, W, rtn)


def test_rounding_rtn_overrides_a_gptq_plan_and_names_it(tied, text_file, tmp_path):
    src, W = tied
    res = export(src, text_file, tmp_path / "out", "compressed-tensors", {"method": "gptq", "bits": 4, "group_size": 64},
                 {"bits": 4, "group_size": 32, "sym": True, "rounding": "rtn"})
    assert res.plan.name.endswith("-head4g32symrtn")
    head = json.loads((res.artifact / "compress-manifest.json").read_text())["quantization"]["lm_head"]
    assert (head["rounding"], head["method"]) == ("rtn", "rtn") and "output_rel_error" not in head
    sm = open_artifact(res.artifact, CPU, torch.float32, dense=True)
    ours_head = torch.cat([w for _, w, _ in sm.head_slices(100)])
    torch.testing.assert_close(ours_head, rtn_reference(W, 4, 32, True, torch.float16), rtol=0, atol=1e-6)


def test_gptq_rounding_of_an_rtn_plan_is_a_config_error_naming_the_key(tied, text_file, tmp_path):
    raw = run_config(tied[0], text_file, tmp_path / "out", quantize={"lm_head": {"bits": 4, "rounding": "gptq"}})
    with pytest.raises(ConfigError, match=r"^quantize\.lm_head\.rounding: gptq needs the Hessian .* method 'rtn'"):
        parse_config(raw)
    # a candidate that switches to rtn under a gptq head is refused before any work, naming it
    raw = run_config(tied[0], text_file, tmp_path / "out",
                     quantize={"method": "gptq", "lm_head": {"bits": 4, "rounding": "gptq"}},
                     candidates=[{"method": "rtn"}])
    with pytest.raises(ConfigError, match=r"candidates\.0\.lm_head\.rounding: gptq needs"):
        preflight(parse_config(raw), tmp_path / "out")
