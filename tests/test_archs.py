"""Every supported architecture family end to end on a tiny random model.

RTN 8-bit per-channel and RTN 4-bit group 64 in one run: the artifacts must be complete
folders, the metrics finite, and the ordering of the errors what rounding implies (8-bit
rounding steps are 16x finer than 4-bit ones, so its KL is orders of magnitude smaller).
"""
from __future__ import annotations

import json
import math

import pytest

from compress.config import parse_config
from compress.formats.writer import MANIFEST, is_complete
from compress.pipeline import run
from tiny_models import FAMILIES, run_config

CANDIDATES = [{"name": "w8", "bits": 8, "group_size": -1}, {"name": "w4", "bits": 4, "group_size": 64}]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(family, model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    cfg = parse_config(run_config(model_dir(family), text_file, out, candidates=CANDIDATES))
    ctx = run(cfg)

    for name in ("w8", "w4"):
        res = ctx.candidates[name]
        assert res.error is None, res.error
        assert res.artifact == out / name
        assert (out / name / MANIFEST).is_file()
        assert is_complete(out / name, check_hashes=True)
        config = json.loads((out / name / "config.json").read_text())
        assert config["model_type"] == family
        quant = json.loads((out / name / MANIFEST).read_text())["quantization"]
        assert config["quantization_config"]["quant_method"] == quant["format"] == cfg.export.format
        assert (quant["bits"], quant["group_size"]) == ((8, -1) if name == "w8" else (4, 64))
        # 2 blocks x (attention + MLP linears): every block linear was quantized.
        n_linears = {"gpt2": 4, "opt": 6}.get(family, 7)
        assert len(res.layers) == 2 * n_linears
        assert res.metrics.linear_bits_per_weight < (9 if name == "w8" else 5)

    ppl0 = ctx.original.perplexity
    kl8 = ctx.candidates["w8"].metrics.kl_divergence
    kl4 = ctx.candidates["w4"].metrics.kl_divergence
    for m in (ctx.candidates["w8"].metrics, ctx.candidates["w4"].metrics):
        assert math.isfinite(m.perplexity) and m.perplexity > 1
        assert m.kl_divergence >= 0
        assert 0 <= m.top1_agreement <= 1
    assert math.isfinite(ppl0) and ppl0 > 1
    # A random model predicts near-uniformly over the 512 ids: perplexity in the hundreds.
    assert 100 < ppl0 < 4 * 512
    assert kl4 > 1e-3, "4-bit rounding must visibly change the logits"
    assert kl8 < kl4 / 30, (kl8, kl4)
    assert ctx.candidates["w8"].metrics.top1_agreement > ctx.candidates["w4"].metrics.top1_agreement
    assert abs(ctx.candidates["w8"].metrics.perplexity / ppl0 - 1) < 0.01

    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]][1:] == ["w8", "w4"]
    assert results["rows"][2]["kl_divergence"] == pytest.approx(kl4)


def test_gemma3_sliding_window_layer_types_survive_export(model_dir, text_file, tmp_path):
    """The artifact keeps Gemma 3's per-layer attention types (a loader needs them)."""
    out = tmp_path / "out"
    cfg = parse_config(run_config(model_dir("gemma3_text"), text_file, out, evaluate={"enabled": False}))
    ctx = run(cfg)
    (name,) = ctx.candidates
    config = json.loads((out / name / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["sliding_window"] == 16
