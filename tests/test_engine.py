"""The engine's core claim: streaming embed -> blocks -> logits is the model's own forward.

For every family, the logits from `StreamedModel` equal those of the transformers model
loaded whole from the same folder. Also: checkpoints whose names lack the base-model prefix,
and a tied lm_head absent from the checkpoint.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from compress.config import ModelConfig
from compress.engine import StreamedModel
from compress.models.checkpoint import CheckpointError, open_checkpoint
from compress.stages.load import load_model
from tiny_models import FAMILIES, VOCAB, make_model, save_model, walk_logits

# Exact up to float32 summation order: batched and per-window matmuls may round differently.
ATOL = 1e-5


def ids_for(n: int = 3, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def stream_logits(sm: StreamedModel, ids: torch.Tensor, spool_dir=None) -> torch.Tensor:
    return walk_logits(sm, ids, spool_dir)


def reference_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        return torch.cat([model(ids[w : w + 1], use_cache=False).logits for w in range(ids.shape[0])])


def streamed(folder) -> StreamedModel:
    return load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu")).streamed()


@pytest.mark.parametrize("family", FAMILIES + ("qwen3", "gemma2"))
def test_streaming_equals_model_forward(family, model_dir):
    folder = model_dir(family)
    ids = ids_for()
    ref = reference_logits(folder, ids)
    got = stream_logits(streamed(folder), ids)
    assert got.shape == ref.shape == (3, 24, VOCAB)
    assert ref.abs().max() > 1  # not a degenerate all-zero model
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


def test_streaming_batches_windows_like_single_windows(model_dir):
    """run_block batches windows (batch_size); the result must not depend on the batch size."""
    folder = model_dir("gemma3_text")
    ids = ids_for(5, 32)
    sm1 = streamed(folder)
    sm1.batch_size = 1
    sm4 = streamed(folder)
    sm4.batch_size = 4
    torch.testing.assert_close(stream_logits(sm4, ids), stream_logits(sm1, ids), rtol=0, atol=ATOL)


def test_run_block_writes_each_batch_over_its_inputs(model_dir):
    """The stream holds block i's outputs after run_block, batch by batch (5 windows in batches
    of 2, so the last batch is short), equal to the block run on each window alone."""
    sm = streamed(model_dir("llama"))
    sm.batch_size = 2
    ids = ids_for(5, 16)
    with sm.embed(ids) as hidden:
        inputs = hidden.read(0, 5)
        block = sm.load_block(0)
        sm.run_block(block, 0, hidden)
        for w in range(5):
            alone = sm.block_output(block, 0, inputs[w : w + 1])
            torch.testing.assert_close(hidden.read(w, w + 1), alone, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt"])
def test_activations_on_disk_equal_activations_in_memory(family, model_dir, tmp_path):
    """A walk whose stream is spooled to a file gives the very same logits as one in memory,
    and leaves nothing in the spool folder."""
    folder = model_dir(family)
    ids = ids_for(5, 16)
    in_memory = stream_logits(streamed(folder), ids)
    on_disk = stream_logits(streamed(folder), ids, tmp_path)
    torch.testing.assert_close(on_disk, in_memory, rtol=0, atol=0)
    assert list(tmp_path.iterdir()) == []


def _strip_prefix(folder, prefix: str) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    assert any(k.startswith(prefix) for k in tensors)
    save_file({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()},
              str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("family,prefix", [("llama", "model."), ("gpt2", "transformer."), ("opt", "model.")])
def test_checkpoint_without_base_model_prefix(family, prefix, tmp_path, tiny_tokenizer):
    """Older checkpoints name tensors `layers.0...` instead of `model.layers.0...`."""
    folder = save_model(make_model(family, seed=3), tmp_path / family, tiny_tokenizer)
    ids = ids_for()
    ref = reference_logits(folder, ids)
    _strip_prefix(folder, prefix)
    assert not any(n.startswith(prefix) for n in open_checkpoint(folder).index)
    got = stream_logits(streamed(folder), ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tied_lm_head_is_the_embedding(family, tmp_path, tiny_tokenizer):
    model = make_model(family, seed=4, tie_word_embeddings=True)
    model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    folder = save_model(model, tmp_path / family, tiny_tokenizer)
    names = open_checkpoint(folder).index
    assert not any(n.endswith("lm_head.weight") for n in names)  # saved once, as the embedding
    ids = ids_for()
    with torch.no_grad():
        ref = torch.cat([model(ids[w : w + 1], use_cache=False).logits for w in range(ids.shape[0])])
    sm = streamed(folder)
    assert sm.model.get_output_embeddings().weight is sm.model.get_input_embeddings().weight
    torch.testing.assert_close(stream_logits(sm, ids), ref, rtol=0, atol=ATOL)


def test_untied_lm_head_missing_is_an_error(tmp_path, tiny_tokenizer):
    """An untied head must come from the checkpoint; a missing one is not silently random."""
    folder = save_model(make_model("llama", seed=5), tmp_path / "llama", tiny_tokenizer)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        streamed(folder)


def test_missing_block_tensor_names_the_tensor(tmp_path, tiny_tokenizer):
    folder = save_model(make_model("llama", seed=6), tmp_path / "llama", tiny_tokenizer)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    sm = streamed(folder)
    sm.load_block(0)
    with pytest.raises(CheckpointError, match="mlp.up_proj.weight"):
        sm.load_block(1)
