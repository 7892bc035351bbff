"""The fisher predictor: the sampled labels follow the model's distribution and their
log-probability gradient equals autograd's; the per-layer Fisher-weighted error of the block
walks equals one computed with plain transformers autograd on the same labels."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress.evaluate.vocab_stream as vocab_stream
from compress.config import ModelConfig, parse_config
from compress.mixed.fisher import fisher_losses
from compress.pipeline import run
from compress.quantizers.base import QuantSpec
from compress.stages.load import load_model
from test_block_kl import LINEARS
from test_sensitivity import slow_rtn
from tiny_models import VOCAB, run_config


def _slices(head, rows=3):
    def get():
        for s in range(0, head.shape[0], rows):
            yield s, head[s : s + rows], None
    return get


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_sampled_gradient_equals_autograd_and_labels_follow_the_model(softcap):
    g = torch.Generator().manual_seed(1)
    head = torch.randn(8, 4, generator=g)
    x = torch.randn(6, 4, generator=g)
    grad, label = vocab_stream.sampled_log_prob_grad(x, _slices(head), softcap, torch.Generator().manual_seed(2))
    xr = x.clone().requires_grad_(True)
    z = xr @ head.t()
    logits = torch.tanh(z / softcap) * softcap if softcap else z
    torch.log_softmax(logits, -1).gather(1, label[:, None]).sum().backward()
    assert torch.allclose(grad, xr.grad, atol=1e-5)
    # one position repeated: the labels' frequencies are the model's probabilities
    many = x[:1].expand(20000, 4)
    _, labels = vocab_stream.sampled_log_prob_grad(many, _slices(head), softcap, torch.Generator().manual_seed(3))
    p = torch.softmax(logits[0].detach(), -1)
    freq = torch.bincount(labels, minlength=8).float() / len(labels)
    assert torch.allclose(freq, p, atol=0.015)


def test_fisher_loss_equals_transformers_autograd_on_the_same_labels(model_dir, monkeypatch):
    folder = model_dir("llama")
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(4))
    labels = []
    real = vocab_stream.sampled_log_prob_grad

    def recording(*a, **k):
        grad, label = real(*a, **k)
        labels.append(label)
        return grad, label

    monkeypatch.setattr(vocab_stream, "sampled_log_prob_grad", recording)
    spec = QuantSpec(3, 32, False)
    sm = load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu")).streamed()
    sm.batch_size = 2  # a batch of two windows and one of one
    names = [f"model.layers.{i}.{n}" for i in range(sm.n_blocks) for n in LINEARS]
    got = fisher_losses(sm, ids, {n: [spec, None] for n in names})

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.requires_grad_(False)
    seen = {}

    def hook(name):
        def fn(module, args, out):
            out.register_hook(lambda g: seen.__setitem__(name, (args[0].detach(), g)))
        return fn

    for n in names:
        model.get_submodule(n).register_forward_hook(hook(n))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # so the linears' outputs need grads
    logits = model(inputs_embeds=emb, use_cache=False).logits
    y = torch.stack(labels).reshape(ids.shape)
    torch.log_softmax(logits, -1).gather(2, y[..., None]).sum().backward()
    for n in names:
        X, G = (t.reshape(-1, t.shape[-1]).double() for t in seen[n])
        W = model.get_submodule(n).weight.double()
        D = W - slow_rtn(W, spec.bits, spec.group_size, spec.sym)
        want = 0.5 * float(((X @ D.t()) * G).sum(1).pow(2).mean())
        assert want > 0 and got[n][0] == pytest.approx(want, rel=1e-3)
        assert got[n][1] == 0.0


def test_fisher_allocation_sums_the_table_and_is_monotone(model_dir, text_file, tmp_path):
    data = run_config(model_dir("llama"), text_file, tmp_path / "out", evaluate={"enabled": False},
                      quantize={"method": "rtn", "bits": 4, "group_size": 64})
    data["candidates"] = [{"name": f"f{x}", "target": {"bits_per_weight": x},
                           "target_options": {"predictor": "fisher", "kl_windows": 2}} for x in (3.0, 3.5, 4.5)]
    ctx = run(parse_config(data))
    allocs = [ctx.candidates[f"f{x}"].allocation for x in (3.0, 3.5, 4.5)]
    assert [a["predicted_loss"] for a in allocs] == sorted((a["predicted_loss"] for a in allocs), reverse=True)
    assert "Fisher" in allocs[0]["predictor"]
    for a in allocs:
        keys = ["float" if l["bits"] is None else f"{l['bits']}/{l['group_size']}/{'sym' if l['sym'] else 'asym'}"
                for l in a["layers"]]
        summed = sum(ctx.sensitivity[l["name"]]["fisher " + k] for l, k in zip(a["layers"], keys))
        assert a["predicted_loss"] == pytest.approx(summed) and summed > 0


@pytest.mark.parametrize("family", ["gpt2", "opt", "gemma3_text", "qwen2"])
def test_kl_predictors_run_on_every_family(family, model_dir, text_file, tmp_path):
    """GPT-2's Conv1D (weights stored transposed), OPT's projection, Gemma 3's per-layer masks:
    the fisher walks and the block KL (the default predictor) go through each, and a coarser
    option never predicts less KL."""
    data = run_config(model_dir(family), text_file, tmp_path / "out", evaluate={"enabled": False},
                      quantize={"method": "rtn", "bits": 2, "group_size": 32})
    options = {"bits": [2, 8], "group_sizes": [32], "unquantized": False}
    data["candidates"] = [{"name": "f", "target": {"bits_per_weight": 3.5},
                           "target_options": {**options, "predictor": "fisher"}},
                          {"name": "default", "target": {"bits_per_weight": 3.5}, "target_options": options}]
    ctx = run(parse_config(data))
    res = ctx.candidates
    assert res["f"].error is None and "Fisher" in res["f"].allocation["predictor"]
    assert res["default"].error is None and "measured KL" in res["default"].allocation["predictor"]
    for name, row in ctx.sensitivity.items():
        assert row["fisher 2/32/asym"] > row["fisher 8/32/asym"] >= 0, name
        assert row["kl_scale"] > 0, name  # every block's KL at 2 bits is measured and positive
