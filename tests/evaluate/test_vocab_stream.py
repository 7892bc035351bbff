"""Metrics from a head read a vocabulary slice at a time equal those from full logits.

The reference in this file computes full-vocabulary logits and `log_softmax`, the textbook
definitions: perplexity = exp(mean NLL of the next token), KL(P_orig || P_cand) per position,
top-1 agreement of the argmaxes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compress.config import EvaluateConfig
from compress.engine import StreamedModel
from compress.evaluate.vocab_stream import vocab_metrics
from compress.models.checkpoint import open_checkpoint
from compress.stages.evaluate import evaluate_streams
from tiny_models import FAMILIES, VOCAB, make_model, save_model, walk_logits


def reference(ref_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, float, float]:
    """(perplexity of `logits`, mean KL(ref || cand), top-1 agreement) from [w, L, V] logits."""
    lq = F.log_softmax(logits.double(), dim=-1)
    lp = F.log_softmax(ref_logits.double(), dim=-1)
    nll = -lq[:, :-1].gather(2, ids[:, 1:, None]).sum()
    ppl = math.exp(float(nll) / (ids.shape[0] * (ids.shape[1] - 1)))
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    top1 = float((ref_logits.argmax(-1) == logits.argmax(-1)).double().mean())
    return ppl, kl, top1


def slices_of(W: torch.Tensor, b, rows: int):
    return lambda: ((s, W[s : s + rows], None if b is None else b[s : s + rows]) for s in range(0, W.shape[0], rows))


@pytest.mark.parametrize("rows", [7, 50, 64])  # ragged last slice, exact, one slice
@pytest.mark.parametrize("bias,cap", [(False, None), (True, None), (False, 3.0)])
def test_equals_full_softmax(rows, bias, cap):
    g = torch.Generator().manual_seed(0)
    w, L, H, V = 3, 17, 16, 50
    x, xr = torch.randn(w, L, H, generator=g), torch.randn(w, L, H, generator=g)
    W, Wr = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    ids = torch.randint(0, V, (w, L), generator=g)

    def full(x, W):
        z = F.linear(x, W, b)
        return torch.tanh(z / cap) * cap if cap else z

    ppl, kl, top1 = reference(full(xr, Wr), full(x, W), ids)
    st = vocab_metrics(x, slices_of(W, b, rows), ids, cap, ref_inputs=xr, ref_head=slices_of(Wr, b, rows), ref_softcap=cap)
    assert st.perplexity == pytest.approx(ppl, rel=1e-5)
    assert st.kl == pytest.approx(kl, rel=1e-4)
    assert st.top1 == pytest.approx(top1)
    alone = vocab_metrics(x, slices_of(W, b, rows), ids, cap)
    assert alone.perplexity == pytest.approx(ppl, rel=1e-5) and alone.kl is None


def test_ties_keep_the_first_row_as_argmax_does():
    g = torch.Generator().manual_seed(1)
    # Small integer weights and inputs: logits tie often, across and within slices.
    x = torch.randint(-1, 2, (2, 9, 4), generator=g).float()
    W = torch.randint(-1, 2, (30, 4), generator=g).float()
    Wr = torch.randint(-1, 2, (30, 4), generator=g).float()
    ids = torch.randint(0, 30, (2, 9), generator=g)
    _, _, top1 = reference(F.linear(x, Wr), F.linear(x, W), ids)
    st = vocab_metrics(x, slices_of(W, None, 4), ids, ref_inputs=x, ref_head=slices_of(Wr, None, 4))
    assert st.top1 == pytest.approx(top1)
    same = vocab_metrics(x, slices_of(W, None, 4), ids, ref_inputs=x, ref_head=slices_of(W, None, 4))
    assert same.top1 == 1.0 and abs(same.kl) < 1e-6


def full_logits(sm: StreamedModel, ids: torch.Tensor) -> torch.Tensor:
    return walk_logits(sm, ids)


def _streamed(folder, stored: bool) -> StreamedModel:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    return StreamedModel(config, open_checkpoint(folder), torch.device("cpu"), torch.float32, stored_outer=stored)


def _poison_head(sm: StreamedModel) -> None:
    """NaN in the in-memory head table: evaluation must read the head from the checkpoint."""
    head = sm.model.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.full_like(head.weight, float("nan")), requires_grad=False)


@pytest.mark.parametrize("family", FAMILIES + ("gemma2",))
@pytest.mark.parametrize("tie", [True, False])
def test_evaluate_streams_equals_model_logits(family, tie, tmp_path, tiny_tokenizer):
    """Original (fp32) vs a different candidate stored in fp16, as an artifact keeps its head:
    the stage's figures equal the reference on the model's own logits (final norm, OPT's
    projection, Gemma 2's soft-capping all applied by transformers)."""
    orig = save_model(make_model(family, seed=0, tie_word_embeddings=tie), tmp_path / "orig", tiny_tokenizer)
    cand = save_model(make_model(family, seed=0, std=0.11, tie_word_embeddings=tie).half(), tmp_path / "cand",
                      tiny_tokenizer)
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(2))
    ppl_ref, kl, top1 = reference(full_logits(_streamed(orig, False), ids), full_logits(_streamed(cand, True), ids), ids)
    ppl_orig, _, _ = reference(full_logits(_streamed(orig, False), ids), full_logits(_streamed(orig, False), ids), ids)

    original, candidate = _streamed(orig, False), _streamed(cand, True)
    _poison_head(original)
    _poison_head(candidate)
    rows = evaluate_streams(original, {"c": lambda: candidate}, ids, EvaluateConfig())
    assert rows["original"].perplexity == pytest.approx(ppl_orig, rel=1e-5)
    assert rows["c"].perplexity == pytest.approx(ppl_ref, rel=1e-5)
    assert rows["c"].kl_divergence == pytest.approx(kl, rel=1e-4)
    assert rows["c"].top1_agreement == pytest.approx(top1)
    assert rows["c"].kl_divergence > 1e-3  # the two models differ: the comparison is not vacuous


def test_reference_perplexity_from_the_paired_pass_equals_its_own_pass():
    g = torch.Generator().manual_seed(3)
    x, xr = torch.randn(2, 11, 8, generator=g), torch.randn(2, 11, 8, generator=g)
    W, Wr = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    ids = torch.randint(0, 40, (2, 11), generator=g)
    ppl_ref, _, _ = reference(F.linear(xr, Wr), F.linear(xr, Wr), ids)
    paired = vocab_metrics(x, slices_of(W, None, 9), ids, ref_inputs=xr, ref_head=slices_of(Wr, None, 9))
    alone = vocab_metrics(xr, slices_of(Wr, None, 9), ids)
    assert paired.ref_perplexity == alone.perplexity  # the same tiles, the same arithmetic
    assert alone.perplexity == pytest.approx(ppl_ref, rel=1e-5)


@pytest.mark.parametrize("divergence", [True, False])
def test_original_perplexity_with_and_without_a_paired_pass(divergence, tmp_path, tiny_tokenizer):
    orig = save_model(make_model("llama", seed=0), tmp_path / "orig", tiny_tokenizer)
    cand = save_model(make_model("llama", seed=1), tmp_path / "cand", tiny_tokenizer)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    ppl_orig, _, _ = reference(full_logits(_streamed(orig, False), ids), full_logits(_streamed(orig, False), ids), ids)
    candidate = _streamed(cand, False)
    rows = evaluate_streams(_streamed(orig, False), {"c": lambda: candidate}, ids,
                            EvaluateConfig(divergence=divergence))
    assert list(rows) == ["original", "c"]
    assert rows["original"].perplexity == pytest.approx(ppl_orig, rel=1e-5)
    assert (rows["c"].kl_divergence is None) == (not divergence)
    no_candidates = evaluate_streams(_streamed(orig, False), {}, ids, EvaluateConfig())
    assert no_candidates["original"].perplexity == pytest.approx(ppl_orig, rel=1e-5)
