"""GGUF k-quants and llama.cpp's mixes written by compress: the types each tensor gets (a table
written from llama.cpp's src/llama-quant.cpp), whole files through transformers' GGUF loader
(logits equal to our torch view of the same codes), and configs a k-quant type cannot hold."""
from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from compress.config import ConfigError, parse_config  # noqa: E402
from compress.formats import gguf_mix  # noqa: E402
from compress.formats.artifact import open_artifact  # noqa: E402
from compress.formats.writer import is_complete  # noqa: E402
from compress.pipeline import preflight, run  # noqa: E402
from tiny_models import make_model, run_config, save_model, transformers_logits, walk_logits  # noqa: E402


# ---- the mixes, against llama-quantize's rules ---------------------------------------------
def _llama_tensors(n_layer: int, hidden: int, ffn: int) -> list[tuple[str, int]]:
    out = [("token_embd.weight", hidden)]
    for i in range(n_layer):
        out += [(f"blk.{i}.attn_q.weight", hidden), (f"blk.{i}.attn_k.weight", hidden),
                (f"blk.{i}.attn_v.weight", hidden), (f"blk.{i}.attn_output.weight", hidden),
                (f"blk.{i}.ffn_gate.weight", hidden), (f"blk.{i}.ffn_up.weight", hidden),
                (f"blk.{i}.ffn_down.weight", ffn)]
    return out


# Written out by hand from llama-quant.cpp (llama_tensor_get_type_impl, tensor_type_fallback) for
# SmolLM2-135M's shape: 30 layers, hidden 576 (not a multiple of 256), ffn 1536, tied embeddings.
# use_more_bits(i, 30): i < 3, i >= 26, or (i - 3) % 3 == 2.
MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


def test_q4_k_m_on_smollm2_shape():
    t = gguf_mix.assign("Q4_K_M", _llama_tensors(30, 576, 1536), tied=True)
    assert t["token_embd.weight"] == "Q8_0"  # tied: the output's rule, 576 % 256 != 0 -> Q8_0
    for i in range(30):
        # Q4_K -> Q5_0 and Q6_K -> Q8_0 on rows of 576
        assert t[f"blk.{i}.attn_v.weight"] == ("Q8_0" if i in MORE_BITS_30 else "Q5_0"), i
        assert t[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in MORE_BITS_30 else "Q4_K"), i
        for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert t[f"blk.{i}.{n}.weight"] == "Q5_0"


def test_q3_k_m_on_smollm2_shape():
    t = gguf_mix.assign("Q3_K_M", _llama_tensors(30, 576, 1536), tied=True)
    assert t["token_embd.weight"] == "Q8_0"
    for i in range(30):
        assert t[f"blk.{i}.attn_v.weight"] == ("Q5_1" if i < 2 else "Q5_0"), i  # Q5_K / Q4_K, fallen back
        assert t[f"blk.{i}.ffn_down.weight"] == ("Q5_K" if i < 1 else "Q4_K"), i  # i < 30/16
        assert t[f"blk.{i}.attn_output.weight"] == "Q5_0"  # Q4_K
        for n in ("attn_q", "attn_k", "ffn_gate", "ffn_up"):
            assert t[f"blk.{i}.{n}.weight"] == "Q4_0"  # Q3_K -> Q4_0


def test_mixes_on_rows_of_256_untied():
    ts = _llama_tensors(16, 512, 1024) + [("output.weight", 512)]
    # use_more_bits(i, 16): i < 2, i >= 14, or (i - 2) % 3 == 2
    more = {0, 1, 4, 7, 10, 13, 14, 15}
    m = gguf_mix.assign("Q4_K_M", ts, tied=False)
    s = gguf_mix.assign("Q4_K_S", ts, tied=False)
    m5 = gguf_mix.assign("Q5_K_M", ts, tied=False)
    pure = gguf_mix.assign("Q4_K", ts, tied=False)
    assert m["output.weight"] == s["output.weight"] == m5["output.weight"] == "Q6_K"
    assert m["token_embd.weight"] == s["token_embd.weight"] == "Q4_K" and m5["token_embd.weight"] == "Q5_K"
    assert set(pure.values()) == {"Q4_K"}  # --pure: output and token_embd too
    for i in range(16):
        assert m[f"blk.{i}.attn_v.weight"] == m[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more else "Q4_K")
        assert m5[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more else "Q5_K")
        assert s[f"blk.{i}.attn_v.weight"] == ("Q5_K" if i < 4 else "Q4_K")
        assert s[f"blk.{i}.ffn_down.weight"] == ("Q5_K" if i < 2 else "Q4_K")
        assert m[f"blk.{i}.attn_q.weight"] == s[f"blk.{i}.ffn_up.weight"] == "Q4_K"
    assert gguf_mix.assign("Q2_K", [("blk.0.attn_q.weight", 100)], tied=False) == {"blk.0.attn_q.weight": "F16"}


# ---- whole files through transformers' GGUF loader -----------------------------------------
CASES = [
    # rows of 256: the k-quants themselves
    ("Q4_K_M", "gptq", dict(hidden_size=256, intermediate_size=512),
     {"blk.0.attn_q.weight": "Q4_K", "blk.0.attn_v.weight": "Q4_K", "blk.1.attn_v.weight": "Q6_K",
      "blk.1.ffn_down.weight": "Q6_K", "token_embd.weight": "Q4_K", "output.weight": "Q6_K"}),
    ("Q3_K_M", "rtn", dict(hidden_size=256, intermediate_size=512),
     # attn_v: i < 2 always; attn_output: rows of 4 heads x 32 = 128 -> Q4_K falls back to Q5_0; ffn_down: i < 2/16 never
     {"blk.0.attn_q.weight": "Q3_K", "blk.0.attn_v.weight": "Q5_K", "blk.1.attn_v.weight": "Q5_K",
      "blk.0.attn_output.weight": "Q5_0", "blk.0.ffn_down.weight": "Q4_K", "output.weight": "Q6_K"}),
    ("Q2_K", "gptq", dict(hidden_size=256, intermediate_size=512), {"blk.1.ffn_up.weight": "Q2_K"}),
    ("Q5_K", "rtn", dict(hidden_size=256, intermediate_size=512), {"blk.1.ffn_down.weight": "Q5_K"}),
    # rows of 576 (SmolLM2's hidden size): the fallbacks
    ("Q3_K_M", "gptq", dict(hidden_size=576, intermediate_size=768, num_attention_heads=4),
     {"blk.0.attn_q.weight": "Q4_0", "blk.0.attn_v.weight": "Q5_1", "blk.0.attn_output.weight": "Q5_0",
      "blk.0.ffn_down.weight": "Q4_K", "blk.1.ffn_down.weight": "Q4_K", "token_embd.weight": "Q4_0",
      "output.weight": "Q8_0"}),
    ("Q6_K", "gptq", dict(hidden_size=576, intermediate_size=768, num_attention_heads=4),
     {"blk.0.attn_q.weight": "Q8_0", "blk.1.ffn_down.weight": "Q6_K"}),
]


@pytest.mark.parametrize("gguf_type,method,dims,expect", CASES,
                         ids=["q4_k_m-gptq", "q3_k_m-rtn", "q2_k-gptq", "q5_k-rtn", "q3_k_m-576-gptq", "q6_k-576-gptq"])
def test_transformers_gguf_loader_gives_our_logits(gguf_type, method, dims, expect, tiny_tokenizer, text_file, tmp_path):
    src = save_model(make_model("llama", seed=5, head_dim=32, **dims), tmp_path / "src", tiny_tokenizer)
    raw = run_config(src, text_file, tmp_path / "out", evaluate={"enabled": False},
                     export={"format": "gguf", "gguf_type": gguf_type})
    raw["quantize"] = {"method": method}  # the type sets bits, group_size and sym
    ctx = run(parse_config(raw))
    (res,) = ctx.candidates.values()
    assert res.error is None and is_complete(res.artifact, check_hashes=True)
    reader = gguf.GGUFReader(str(res.artifact / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {k: types[k] for k in expect} == expect
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert {r.method for r in res.layers} == {method}

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    theirs = transformers_logits(res.artifact, ids, gguf_file="model.gguf")
    ours = walk_logits(open_artifact(res.artifact, torch.device("cpu"), torch.float32, dense=True), ids)
    # the same float weights on both sides (gguf-py's dequantization, ours bit-equal): only
    # summation order differs
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ---- configs a k-quant type cannot hold (exit 2, naming the key) -----------------------------
@pytest.mark.parametrize("quantize,gguf_type,fmt,message", [
    ({"method": "rtn", "group_size": 64}, "Q4_K_M", "gguf", "quantize.group_size: export.gguf_type Q4_K_M is a mix"),
    ({"method": "rtn", "bits": 4}, "Q4_K_M", "gguf", "quantize.bits: export.gguf_type Q4_K_M is a mix"),
    ({"method": "gptq", "group_size": 128}, "Q4_K", "gguf", "quantize.group_size: export.gguf_type Q4_K implies bits 4, group_size 32, sym false"),
    ({"method": "rtn", "sym": True}, "Q5_K", "gguf", "quantize.sym: export.gguf_type Q5_K implies"),
    ({"method": "smoothquant"}, "Q4_K_M", "gguf", "quantize.method: smoothquant cannot round on GGUF Q4_K_M's block grid"),
    ({"method": "awq", "clip": True}, "Q4_K", "gguf", "quantize.clip: GGUF Q4_K's block grid chooses its own ranges"),
    ({"method": "rtn", "overrides": [{"pattern": "down", "bits": 8}]}, "Q4_K_M", "gguf",
     "quantize.overrides.0.bits: export.gguf_type Q4_K_M sets the grid"),
    ({"method": "rtn", "overrides": [{"pattern": "down", "gguf_type": "Q6_K"}]}, None, "gptq",
     "quantize.overrides.0.gguf_type: applies to export.format: gguf only"),
])
def test_preflight_names_the_key(quantize, gguf_type, fmt, message, model_dir, text_file, tmp_path):
    raw = run_config(model_dir("llama"), text_file, tmp_path / "out",
                     export={"format": fmt, **({"gguf_type": gguf_type} if gguf_type else {})})
    raw["quantize"] = quantize
    cfg = parse_config(raw)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        preflight(cfg, tmp_path / "out")


def test_pure_type_accepts_its_own_grid(model_dir, text_file, tmp_path):
    raw = run_config(model_dir("llama"), text_file, tmp_path / "out", export={"format": "gguf", "gguf_type": "Q4_K"})
    raw["quantize"] = {"method": "gptq", "bits": 4, "group_size": 32, "sym": False}
    assert len(preflight(parse_config(raw), tmp_path / "out")) == 1
