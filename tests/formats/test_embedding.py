"""`quantize.embedding`: the input embedding rounded to nearest and stored quantized
(compressed-tensors int-quantized 8-bit, what transformers loads). A tied head is untied and
kept in float (or quantized by `quantize.lm_head`). The table our loader reads back is the RTN
of the original (the loop-by-loop reference of test_lm_head), transformers + compressed-tensors
gives our loader's logits, the file holds what the bytes model says, and formats and grids
that cannot hold it refuse at preflight naming `quantize.embedding`."""
from __future__ import annotations

import json

import pytest
import torch

from compress.config import ConfigError, parse_config
from compress.formats.artifact import open_artifact
from compress.formats.registry import get_format
from compress.formats.writer import is_complete
from compress.pipeline import preflight, run
from compress.serving import safetensors_tensor_bytes
from test_lm_head import rtn_reference
from tiny_models import VOCAB, family_tokenizer, make_model, run_config, save_model, transformers_logits, walk_logits

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    model = make_model("llama", seed=7, tie_word_embeddings=True)
    src = save_model(model, tmp_path_factory.mktemp("tied") / "src", family_tokenizer("llama"))
    return src, model.get_input_embeddings().weight.detach().clone()


def export(src, text_file, out, quantize, fmt="compressed-tensors"):
    cfg = parse_config(run_config(src, text_file, out, evaluate={"enabled": False}, quantize=quantize,
                                  export={"format": fmt}))
    (res,) = run(cfg).candidates.values()
    assert res.error is None and is_complete(res.artifact, check_hashes=True)
    return res


@pytest.mark.parametrize("embedding,lm_head", [
    ({"bits": 8, "group_size": 32, "sym": True}, None),
    ({"bits": 8, "group_size": -1, "sym": True}, {"bits": 4, "group_size": 32}),
])
def test_embedding_reads_back_as_rtn_and_transformers_agrees(embedding, lm_head, tied, text_file, tmp_path):
    src, W = tied
    res = export(src, text_file, tmp_path / "out", {"bits": 4, "group_size": 64, "embedding": embedding,
                                                    "lm_head": lm_head})
    man = json.loads((res.artifact / "compress-manifest.json").read_text())
    emb = man["quantization"]["embedding"]
    assert (emb["bits"], emb["group_size"], emb["sym"]) == (8, embedding["group_size"], True)
    assert 0 < emb["weight_rel_error"] < 0.01
    config = json.loads((res.artifact / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    groups = config["quantization_config"]["config_groups"]
    (group,) = [g for g in groups.values() if g["targets"] == ["model.embed_tokens"]]
    assert group["format"] == "int-quantized" and group["input_activations"] is None
    assert "-emb8" in res.plan.name

    sm = open_artifact(res.artifact, CPU, torch.float32)
    ref = rtn_reference(W, 8, embedding["group_size"], True, torch.float16)
    torch.testing.assert_close(sm.model.get_input_embeddings().weight, ref, rtol=0, atol=1e-6)
    head = torch.cat([w for _, w, _ in sm.head_slices(100)])
    if lm_head is None:  # the untied head is the original table in export.dtype
        torch.testing.assert_close(head, W.half().float(), rtol=0, atol=0)
    else:
        torch.testing.assert_close(head, rtn_reference(W, 4, 32, False, torch.float16), rtol=0, atol=1e-6)

    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(walk_logits(sm, ids), transformers_logits(res.artifact, ids), rtol=1e-4, atol=1e-4)

    # the bytes model counts what was written (embedding, untied head, the rest)
    from compress.mixed.plan import fixed_bytes, slots
    from compress.stages.load import load_model

    q = res.plan.q
    fmt = get_format("compressed-tensors")
    src_sm = load_model(parse_config(run_config(src, text_file, tmp_path / "x")).model).streamed()
    s = slots(src_sm, q, fmt, torch.float16, with_bias=True)
    chosen = sum(x.bytes[x.options.index(q.spec(q.bits, q.group_size, q.sym).grid)] for x in s)
    assert chosen + fixed_bytes(src_sm, {x.name for x in s}, torch.float16, q, fmt) == safetensors_tensor_bytes(res.artifact)


@pytest.mark.parametrize("fmt,embedding,why", [
    ("gptq", {"bits": 8}, "keep the embedding in export.dtype"),
    ("compressed-tensors", {"bits": 4, "sym": True}, "int-quantized 8-bit symmetric"),
    ("compressed-tensors", {"bits": 8, "sym": False}, "int-quantized 8-bit symmetric"),
])
def test_refused_at_preflight(fmt, embedding, why, tied, text_file, tmp_path):
    src, _ = tied
    cfg = parse_config(run_config(src, text_file, tmp_path / "out", quantize={"embedding": embedding},
                                  export={"format": fmt}))
    with pytest.raises(ConfigError, match=f"quantize.embedding: .*{why}"):
        preflight(cfg, tmp_path / "out")


def test_gptq_rounding_is_a_config_error(tied, text_file, tmp_path):
    src, _ = tied
    with pytest.raises(ConfigError, match="quantize.embedding.rounding"):
        parse_config(run_config(src, text_file, tmp_path / "out",
                                quantize={"method": "gptq", "embedding": {"bits": 8, "rounding": "gptq"}}))


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "opt"])
def test_other_families_agree_with_transformers(family, text_file, tmp_path):
    """Gemma 3's scaled embedding and OPT's (with its positional table left in float)."""
    model = make_model(family, seed=3, tie_word_embeddings=True)
    src = save_model(model, tmp_path / "src", family_tokenizer(family))
    res = export(src, text_file, tmp_path / "out", {"bits": 4, "group_size": 32,
                                                    "embedding": {"bits": 8, "group_size": 32, "sym": True}})
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    ours = walk_logits(open_artifact(res.artifact, CPU, torch.float32), ids)
    torch.testing.assert_close(ours, transformers_logits(res.artifact, ids), rtol=1e-4, atol=1e-4)
    man = json.loads((res.artifact / "compress-manifest.json").read_text())["quantization"]
    assert man["embedding"]["name"] == next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
