"""Embedding and head kept in their stored fp16 give the logits of a float32 copy of them."""
from __future__ import annotations

import pytest
import torch

from compress.engine import StreamedModel
from compress.models.checkpoint import open_checkpoint
from compress.stored_outer import UpcastLinear
from tiny_models import VOCAB, make_model, save_model, walk_logits


def fp16_folder(family: str, tmp_path, tokenizer, tie: bool):
    model = make_model(family, seed=5, tie_word_embeddings=tie).half()
    return save_model(model, tmp_path / f"{family}-{tie}", tokenizer)


def logits(sm: StreamedModel, ids: torch.Tensor) -> torch.Tensor:
    return walk_logits(sm, ids)


@pytest.mark.parametrize("family,tie", [("llama", True), ("llama", False), ("gpt2", True), ("gemma", True)])
def test_stored_outer_logits_equal_float32_copy(family, tie, tmp_path, tiny_tokenizer):
    folder = fp16_folder(family, tmp_path, tiny_tokenizer, tie)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    make = lambda stored: StreamedModel(  # noqa: E731
        config, open_checkpoint(folder), torch.device("cpu"), torch.float32, stored_outer=stored
    )
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    full, stored = make(False), make(True)
    ref, got = logits(full, ids), logits(stored, ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    emb = stored.model.get_input_embeddings()
    if family == "gemma":  # a scaled embedding computes in its weight's dtype: left in float32
        assert emb.weight.dtype == torch.float32
    else:
        assert emb.weight.dtype == torch.float16
        assert isinstance(stored.model.get_output_embeddings(), UpcastLinear)
        assert stored.model.get_output_embeddings().weight.dtype == torch.float16
        if tie:  # one fp16 tensor serves both
            assert stored.model.get_output_embeddings().weight is emb.weight
