"""The serving memory formula against hand-computed values for SmolLM2-135M's config."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from compress.config import ServingConfig
from compress.serving import (
    GIB, AttentionShape, attention_shape, fits, kv_cache_bytes, load_gpus, safetensors_tensor_bytes, serving_need,
)

# SmolLM2-135M: 30 layers, hidden 576, 9 query heads, 3 KV heads (GQA), head_dim 64.
SMOLLM2 = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152)


def test_smollm2_attention_shape():
    assert attention_shape(SMOLLM2) == AttentionShape(layers=30, kv_heads=3, head_dim=64)


def test_smollm2_kv_cache_by_hand():
    shape = attention_shape(SMOLLM2)
    # 2 x 30 x 3 x 64 x 4096 x 1 x 2 bytes = 94,371,840 bytes = 90 MiB
    assert kv_cache_bytes(shape, 4096, 1, "float16") == 94_371_840
    # batch 8 at context 2048 in fp8: 2 x 30 x 3 x 64 x 2048 x 8 x 1 = 188,743,680
    assert kv_cache_bytes(shape, 2048, 8, "float8") == 188_743_680
    # without GQA (9 KV heads) the cache would be 3x larger
    mha = AttentionShape(30, 9, 64)
    assert kv_cache_bytes(mha, 4096, 1, "float16") == 3 * 94_371_840


def test_serving_need_and_gpu_fit():
    shape = attention_shape(SMOLLM2)
    need = serving_need(100_000_000, shape, ServingConfig(context_length=4096, batch=1, overhead_gb=1.0))
    assert need.total_bytes == 100_000_000 + 94_371_840 + GIB
    gpus = load_gpus()
    assert [g.memory_gb for g in gpus] == [8, 12, 16, 24, 48, 80]
    assert len(fits(need, gpus)) == 6
    # 20 GiB of weights: fits 24 GB and up only
    big = serving_need(20 * GIB, shape, ServingConfig(overhead_gb=1.0))
    assert [g.memory_gb for g in gpus if g.name in fits(big, gpus)] == [24, 48, 80]
    # exactly at the limit fits; one byte over does not
    edge = serving_need(8 * GIB - 94_371_840 - GIB, shape, ServingConfig(overhead_gb=1.0))
    assert fits(edge, gpus)[0] == gpus[0].name
    over = serving_need(8 * GIB - 94_371_840 - GIB + 1, shape, ServingConfig(overhead_gb=1.0))
    assert fits(over, gpus)[0] == gpus[1].name


def test_gpt2_and_opt_names():
    from transformers import GPT2Config, OPTConfig

    assert attention_shape(GPT2Config(n_layer=12, n_head=12, n_embd=768)) == AttentionShape(12, 12, 64)
    assert attention_shape(OPTConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=128)) == AttentionShape(2, 4, 32)


def test_weights_are_tensor_bytes_without_headers(tmp_path):
    save_file({"a": torch.zeros(10, 3, dtype=torch.float16), "b": torch.zeros(7, dtype=torch.int32)},
              str(tmp_path / "model.safetensors"))
    save_file({"c": torch.zeros(5, dtype=torch.float32)}, str(tmp_path / "model-2.safetensors"))
    assert safetensors_tensor_bytes(tmp_path) == 10 * 3 * 2 + 7 * 4 + 5 * 4
    with open(tmp_path / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        assert json.loads(f.read(n))["a"]["dtype"] == "F16"


def test_gpu_table_errors(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text("gpus:\n  - {name: x, memory: 8}\n")
    with pytest.raises(ValueError, match=r"serving.gpus: .*gpus.0 needs exactly 'name' and 'memory_gb'"):
        load_gpus(bad)
    with pytest.raises(ValueError, match="serving.gpus: .* not found"):
        load_gpus(tmp_path / "missing.yaml")
