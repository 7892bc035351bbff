"""The block_kl predictor: each block's measured whole-model KL equals an independent
computation with plain transformers forward passes (only that block's linears replaced by a
slow round-to-nearest), the multi-model KL equals the paired one, the allocation it drives
keeps its invariants, and its options are validated."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.config import ConfigError, ModelConfig, parse_config
from compress.evaluate.vocab_stream import kl_divergences, vocab_metrics
from compress.mixed.sensitivity import measure
from compress.pipeline import run
from compress.quantizers.base import QuantSpec
from compress.stages.load import load_model
from test_mixed_pipeline import mean_kl
from test_sensitivity import slow_rtn
from tiny_models import VOCAB, run_config

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_block_kl_equals_transformers_forwards_with_one_block_quantized(model_dir):
    folder = model_dir("llama")
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(7))
    spec = QuantSpec(2, 32, False)
    sm = load_model(ModelConfig(source=str(folder), dtype="float32", device="cpu")).streamed()
    names = [f"model.layers.{i}.{n}" for i in range(sm.n_blocks) for n in LINEARS]
    # block 1 keeps its down_proj: a layer without the reference option stays in float
    reference = {n: spec for n in names if n != "model.layers.1.mlp.down_proj"}
    got = measure(sm, ids, {n: [spec] for n in names}, reference=reference, kl_windows=2).block_kl

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        want_ids = ids[:2]  # kl_windows: the first two windows
        ref = model(want_ids, use_cache=False).logits
        assert len(got) == len(model.model.layers) == 2
        for i in range(2):
            q = copy.deepcopy(model)
            for n in LINEARS:
                full = f"model.layers.{i}.{n}"
                if full in reference:
                    lin = q.get_submodule(full)
                    lin.weight.copy_(slow_rtn(lin.weight.detach(), spec.bits, spec.group_size, spec.sym).float())
            want = mean_kl(ref, q(want_ids, use_cache=False).logits)
            assert want > 1e-4 and got[i] == pytest.approx(want, rel=1e-3, abs=1e-7)


def test_kl_divergences_equal_the_paired_vocab_metrics():
    g = torch.Generator().manual_seed(3)
    head = torch.randn(50, 8, generator=g)
    ref = torch.randn(2, 5, 8, generator=g)
    cands = [ref + 0.3 * torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    ids = torch.randint(0, 50, (2, 5), generator=g)

    def slices():  # vocabulary slices of 16 rows, the last one 2
        for s in range(0, 50, 16):
            yield s, head[s : s + 16], None

    got = kl_divergences(ref, cands, slices)
    for c, kl in zip(cands, got):
        want = vocab_metrics(c, slices, ids, ref_inputs=ref, ref_head=slices).kl
        assert kl == pytest.approx(want, rel=1e-5) and kl > 0
        assert kl == pytest.approx(mean_kl(ref @ head.t(), c @ head.t()), rel=1e-4)


def test_block_kl_allocation_is_in_kl_units_and_monotone(model_dir, text_file, tmp_path):
    data = run_config(model_dir("llama"), text_file, tmp_path / "out", evaluate={"enabled": False},
                      quantize={"method": "rtn", "bits": 4, "group_size": 64})
    opts = {"predictor": "block_kl", "reference_bits": 3, "kl_windows": 2}
    data["candidates"] = [{"name": f"b{x}", "target": {"bits_per_weight": x}, "target_options": opts}
                          for x in (3.0, 3.5, 4.5)]
    ctx = run(parse_config(data))
    sens = ctx.sensitivity
    allocs = [ctx.candidates[f"b{x}"].allocation for x in (3.0, 3.5, 4.5)]
    assert [a["predicted_loss"] for a in allocs] == sorted((a["predicted_loss"] for a in allocs), reverse=True)
    assert "measured KL" in allocs[0]["predictor"] and "3/64/asym" in allocs[0]["predictor"]
    for a in allocs:
        summed = 0.0
        for l in a["layers"]:
            key = "float" if l["bits"] is None else f"{l['bits']}/{l['group_size']}/{'sym' if l['sym'] else 'asym'}"
            summed += sens[l["name"]][key] / sens[l["name"]]["output_energy"] * sens[l["name"]]["kl_scale"]
        assert a["predicted_loss"] == pytest.approx(summed)
    # every layer at the reference option: the prediction is the sum of the measured block KLs
    # (kl_scale is KL_b over its block's summed relative error there), so each is positive
    by_block: dict[str, float] = {}
    for n, v in sens.items():
        block = n.split(".")[2]
        by_block[block] = by_block.get(block, 0.0) + v["3/64/asym"] / v["output_energy"] * v["kl_scale"]
    assert len(by_block) == 2 and all(v > 0 for v in by_block.values())


@pytest.mark.parametrize("options,message", [
    ({"predictor": "kl"}, "quantize.target_options.predictor: Input should be 'output_error', "
                          "'relative_output_error', 'block_kl' or 'fisher'"),
    ({"kl_windows": 0}, "quantize.target_options.kl_windows: Input should be greater than or equal to 1"),
    ({"reference_bits": 7}, "quantize.target_options.reference_bits: Input should be 2, 3, 4, 5, 6 or 8"),
])
def test_block_kl_options_errors_name_the_key(options, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"model": {"source": "x"}, "quantize": {"method": "rtn", "target": {"bits_per_weight": 3},
                                                             "target_options": options}})


def test_block_kl_candidates_must_share_one_reference(model_dir, text_file, tmp_path):
    data = run_config(model_dir("llama"), text_file, tmp_path / "out", evaluate={"enabled": False},
                      quantize={"method": "rtn", "bits": 4, "group_size": 64})
    data["candidates"] = [{"name": f"r{b}", "target": {"bits_per_weight": 3.5},
                           "target_options": {"predictor": "block_kl", "reference_bits": b}} for b in (3, 4)]
    with pytest.raises(ConfigError, match="quantize.target_options.reference_bits: candidates with predictor "
                                          r"block_kl must share one reference option .*'3/64/asym', '4/64/asym'"):
        run(parse_config(data))


def test_kl_predictors_must_share_their_windows(model_dir, text_file, tmp_path):
    data = run_config(model_dir("llama"), text_file, tmp_path / "out", evaluate={"enabled": False},
                      quantize={"method": "rtn", "bits": 4, "group_size": 64})
    data["candidates"] = [{"name": p, "target": {"bits_per_weight": 3.5},
                           "target_options": {"predictor": p, "kl_windows": k}}
                          for p, k in (("block_kl", 2), ("fisher", 3), ("relative_output_error", 4))]
    with pytest.raises(ConfigError, match=r"quantize.target_options.kl_windows: candidates with predictor "
                                          r"block_kl or fisher must share one; got \[2, 3\]"):
        run(parse_config(data))
