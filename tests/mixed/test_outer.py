"""The embedding and lm_head as options of a byte budget (`target_options.outer_bits`): their
measured KL (`compress.mixed.outer`) equals the KL of the whole model run with only that tensor
rounded, and a budget too small for them in float writes them quantized, bytes exactly as
allocated, read back by transformers + compressed-tensors as by our loader."""
from __future__ import annotations

import json

import pytest
import torch

from compress.config import ConfigError, parse_config
from compress.formats.artifact import open_artifact
from compress.formats.registry import get_format
from compress.mixed.outer import outer_kl, rounded
from compress.mixed.plan import outer_bytes, outer_slot, slots
from compress.pipeline import run
from compress.quantizers.base import QuantSpec
from compress.serving import safetensors_tensor_bytes
from compress.stages.load import load_model
from test_mixed_pipeline import mean_kl
from tiny_models import VOCAB, family_tokenizer, make_model, run_config, save_model, transformers_logits, walk_logits

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    model = make_model("llama", seed=11, tie_word_embeddings=True)
    return save_model(model, tmp_path_factory.mktemp("tied") / "src", family_tokenizer("llama")), model


def test_outer_kl_is_the_kl_with_only_that_tensor_rounded(tied, text_file, tmp_path):
    src, model = tied
    sm = load_model(parse_config(run_config(src, text_file, tmp_path / "x")).model).streamed()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    specs = [QuantSpec(8, 32, True), QuantSpec(4, 32, True)]
    emb_kl, head_kl = outer_kl(sm, ids, specs, specs)
    model = model.float().eval()
    with torch.no_grad():
        ref = model(ids).logits
        W = model.get_input_embeddings().weight.detach().clone()
        for spec, got_e, got_h in zip(specs, emb_kl, head_kl):
            untied = make_model("llama", seed=11, tie_word_embeddings=False).float().eval()
            untied.load_state_dict(model.state_dict(), strict=False)
            untied.lm_head.weight.copy_(W)
            untied.get_input_embeddings().weight.copy_(rounded(W, spec))
            assert got_e == pytest.approx(mean_kl(ref, untied(ids).logits), rel=1e-3, abs=1e-7)
            untied.get_input_embeddings().weight.copy_(W)
            untied.lm_head.weight.copy_(rounded(W, spec))
            assert got_h == pytest.approx(mean_kl(ref, untied(ids).logits), rel=1e-3, abs=1e-7)
    assert 0 < emb_kl[0] < emb_kl[1] and 0 < head_kl[0] < head_kl[1]  # 4 bits lose more than 8


def test_a_budget_below_float_outer_tensors_quantizes_them(tied, text_file, tmp_path):
    src, _ = tied
    base = run_config(src, text_file, tmp_path / "out", evaluate={"enabled": False},
                      quantize={"method": "rtn", "bits": 4, "group_size": 32})
    cfg = parse_config(base)
    sm = load_model(cfg.model).streamed()
    fmt, dtype = get_format("compressed-tensors"), torch.float16
    q = cfg.quantize.model_copy(update={"target": parse_config(
        {**base, "quantize": {**base["quantize"], "target": {"max_bytes": 1}}}).quantize.target})
    outer = outer_slot(sm, q, fmt, dtype, cfg.export)
    assert outer is not None and (None, None) in outer.options and len(outer.options) > 4
    assert all(e is None or (e.bits, e.sym) == (8, True) for e, _ in outer.options)  # what the format holds
    lin = slots(sm, q, fmt, dtype, with_bias=True)
    rest = sum(t.numel() * 2 for i in range(sm.n_blocks) for n, t in sm.templates[i].state_dict().items()
               if f"{sm.block_prefix}{i}.{n.rsplit('.', 1)[0]}" not in {s.name for s in lin})
    # every linear at its middle option, the outer tensors in float: 1 kB over budget
    mid = sum(sorted(s.bytes)[len(s.bytes) // 2] for s in lin)
    budget = mid + rest + outer_bytes(sm, dtype, fmt, None, None) - 1000
    data = dict(base, quantize={**base["quantize"], "target": {"max_bytes": budget}})
    (res,) = run(parse_config(data)).candidates.values()
    a = res.allocation
    assert res.error is None and a["outer"] is not None
    assert a["outer"]["embedding"]["bits"] is not None or a["outer"]["lm_head"]["bits"] is not None
    assert a["achieved_bytes"] == safetensors_tensor_bytes(res.artifact) <= budget
    man = json.loads((res.artifact / "compress-manifest.json").read_text())["quantization"]
    for key in ("embedding", "lm_head"):
        chosen = a["outer"][key]
        assert (man.get(key) or {}).get("bits") == chosen["bits"]
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    ours = walk_logits(open_artifact(res.artifact, CPU, torch.float32), ids)
    assert mean_kl(ours, transformers_logits(res.artifact, ids)) < 1e-6


def test_outer_bits_need_a_predictor_in_kl_units_and_a_byte_budget(tied, text_file, tmp_path):
    src, _ = tied
    with pytest.raises(ConfigError, match="quantize.target_options.outer_bits"):
        parse_config(run_config(src, text_file, tmp_path / "o", quantize={
            "target": {"max_bytes": 10**6}, "target_options": {"predictor": "relative_output_error", "outer_bits": [8]}}))
    with pytest.raises(ConfigError, match="quantize.target_options.outer_bits"):
        parse_config(run_config(src, text_file, tmp_path / "o", quantize={
            "target": {"bits_per_weight": 3}, "target_options": {"outer_bits": [8]}}))


def test_onnx_budget_below_the_float_table_shares_it_as_the_quantized_head(tied, text_file, tmp_path):
    """ONNX stores a tied table once as the quantized head (GatherBlockQuantized reads its rows):
    a budget below the float32 table picks such a head, counts the table once, predicts its loss
    as the embedding's and the head's on that grid, and ONNX Runtime runs what was written."""
    from compress.evaluate.onnx_runtime import OrtDecoder, head_inputs, head_slices

    src, model = tied
    base = run_config(src, text_file, tmp_path / "out", quantize={"method": "rtn", "bits": 4, "group_size": 32},
                      export={"format": "onnx", "dtype": "float32"}, evaluate={"enabled": False})
    cfg = parse_config(base)
    sm = load_model(cfg.model).streamed()
    fmt = get_format("onnx")
    q = cfg.quantize.model_copy(update={"target": parse_config(
        {**base, "quantize": {**base["quantize"], "target": {"max_bytes": 1}}}).quantize.target})
    outer = outer_slot(sm, q, fmt, torch.float32, cfg.export)
    assert outer.shared and all(e is None for e, _ in outer.options)  # ONNX quantizes no table of its own
    table = VOCAB * model.config.hidden_size * 4
    floats = outer_bytes(sm, torch.float32, fmt, None, None)
    for (_, h), b in zip(outer.options, outer.bytes):
        if h is not None:  # the float32 table gone, the head's MatMulNBits in its place
            assert b == floats - table + fmt.linear_bytes((VOCAB, model.config.hidden_size), h, False, torch.float32)
    lin = slots(sm, q, fmt, torch.float32, with_bias=True)
    # the linears at their smallest: the float32 table does not fit beside them
    budget = (sum(min(s.bytes) for s in lin) + fmt.graph_bytes(sm.model.config) + floats - table // 2
              + sum(t.numel() * 4 for i in range(sm.n_blocks) for n, t in sm.templates[i].state_dict().items()
                    if f"{sm.block_prefix}{i}.{n.rsplit('.', 1)[0]}" not in {s.name for s in lin}))
    data = dict(base, quantize={**base["quantize"], "target": {"max_bytes": budget}})
    (res,) = run(parse_config(data)).candidates.values()
    a = res.allocation
    assert res.error is None and a["outer"]["shared"] and a["outer"]["lm_head"]["bits"] is not None
    assert a["outer"]["embedding"]["bits"] is None and a["outer"]["predicted_loss"] > 0
    assert a["achieved_bytes"] == safetensors_tensor_bytes(res.artifact) <= budget
    man = json.loads((res.artifact / "compress-manifest.json").read_text())["quantization"]
    assert man["lm_head"]["shared_with_embedding"] and "embedding" not in man
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    head = torch.cat([w for _, w, _ in head_slices(res.artifact, 100)])
    torch.testing.assert_close(head_inputs(res.artifact, ids) @ head.T, OrtDecoder(res.artifact).logits(ids),
                               rtol=0, atol=1e-4)


def test_a_gptq_head_is_measured_as_gptq_rounds_it(tied, text_file, tmp_path):
    """A calibrated method rounds the head by GPTQ: the walk gives the head inputs' Hessian
    (2/n sum x x^T of the final norm's output), and the head's measured KL is the whole model's
    with the head as the exporter's `round_head` rounds it, below round to nearest's."""
    from compress.mixed.outer import gptq_rows
    from compress.mixed.sensitivity import measure
    from compress.quantizers.gptq import GPTQSpec
    from compress.stages.head import round_head

    src, model = tied
    sm = load_model(parse_config(run_config(src, text_file, tmp_path / "x")).model).streamed()
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(4))
    model = model.float().eval()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    x = out.hidden_states[-1].reshape(-1, model.config.hidden_size).double()  # after the final norm
    layer = f"{sm.block_prefix}0.mlp.down_proj"
    H = measure(sm, ids, {layer: [QuantSpec(4, 32, True)]}, head=True).head_hessian
    torch.testing.assert_close(H.double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)

    grid = QuantSpec(4, 32, True)
    spec = GPTQSpec(4, 32, True, static_groups=True)
    sm = load_model(parse_config(run_config(src, text_file, tmp_path / "x")).model).streamed()
    _, (kl_rtn, kl_gptq) = outer_kl(sm, ids, [], [grid, gptq_rows(H, spec)])
    W = model.get_input_embeddings().weight.detach().clone()
    want = round_head([W], grid, "lm_head", H, spec).weight.dequantize(torch.float32)
    untied = make_model("llama", seed=11, tie_word_embeddings=False).float().eval()
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        untied.get_input_embeddings().weight.copy_(W)
        untied.lm_head.weight.copy_(want)
        assert kl_gptq == pytest.approx(mean_kl(out.logits, untied(ids).logits), rel=1e-3, abs=1e-7)
    assert 0 < kl_gptq < kl_rtn


def test_a_gptq_plans_shared_table_is_predicted_with_its_gptq_head(tied, text_file, tmp_path):
    """In ONNX a tied table is the head's codes: under GPTQ both the head's and the embedding's
    predicted KL are measured on the GPTQ-rounded head, and the chosen option's loss is their sum."""
    src, _ = tied
    base = run_config(src, text_file, tmp_path / "out", quantize={"method": "gptq", "bits": 4, "group_size": 32},
                      export={"format": "onnx", "dtype": "float32"}, evaluate={"enabled": False})
    sizes = {}
    for bits in (4, 8):  # uniform plans with a shared head: the budget between them
        data = dict(base, quantize={**base["quantize"], "bits": bits, "lm_head": {"bits": bits}})
        data["export"] = {**base["export"], "output_dir": str(tmp_path / f"u{bits}")}
        (r,) = run(parse_config(data)).candidates.values()
        sizes[bits] = safetensors_tensor_bytes(r.artifact)
    data = dict(base, quantize={**base["quantize"], "target": {"max_bytes": (sizes[4] + sizes[8]) // 2}})
    ctx = run(parse_config(data))
    (res,) = ctx.candidates.values()
    a = res.allocation["outer"]
    assert res.error is None and a["shared"]
    emb, head = ctx.sensitivity[a["embedding"]["name"]], ctx.sensitivity[a["lm_head"]["name"]]
    assert emb.keys() == head.keys() and all(k.endswith(" gptq") for k in head)
    h = a["lm_head"]
    label = f"KL {h['bits']}/{h['group_size']}/{'sym' if h['sym'] else 'asym'} gptq"
    assert a["predicted_loss"] == pytest.approx(emb[label] + head[label])
