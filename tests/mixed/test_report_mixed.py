"""The report's mixed-precision section and plot, from an allocation record."""
from __future__ import annotations

from compress.report.mixed import section


def allocation():
    layers = [
        {"name": f"model.layers.{b}.{m}", "bits": bits, "group_size": gs, "sym": True, "bytes": 10, "predicted_loss": 1.0}
        for b, rows in enumerate([[(4, 64), (3, -1)], [(None, None), (8, 64)]])
        for m, (bits, gs) in zip(["self_attn.q_proj", "mlp.down_proj"], rows)
    ]
    return {"target": {"bits_per_weight": 3.5}, "counts": "quantizable linears", "budget_bytes": 100,
            "achieved_bytes": 98, "predicted_loss": 12.5, "block_prefix": "model.layers.", "layers": layers}


def test_section_lists_bytes_fit_predicted_and_measured_and_bits_per_block():
    rows = [{"name": "m", "bytes": 1234567, "fits_on": ["8 GB", "12 GB"], "kl_divergence": 0.0421}]
    md = section(rows, {"m": allocation()})
    assert "| m | bits_per_weight=3.5 | 100 (quantizable linears) | 98 | 1,234,567 | 8 GB | 12.5 | 0.0421 |" in md
    assert "### m: bits per layer (1 x 3-bit, 1 x 4-bit, 1 x 8-bit, 1 x float)" in md
    assert "| block | q_proj | down_proj |" in md
    assert "| 0 | 4/g64 | 3/ch |" in md and "| 1 | float | 8/g64 |" in md
    assert section(rows, {}) == ""


def test_bits_plot_is_a_png():
    from compress.report.plots import mixed_bits

    png = mixed_bits({"m": allocation(), "n": allocation()})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_section_says_how_the_embedding_and_head_are_stored():
    a = {**allocation(), "outer": {
        "embedding": {"name": "model.embed_tokens", "bits": 8, "group_size": -1, "sym": True},
        "lm_head": {"name": "lm_head", "bits": None, "group_size": None, "sym": None},
        "bytes": 5000, "predicted_loss": 0.0012}}
    md = section([{"name": "m"}], {"m": a})
    assert ("Outside the blocks: embedding 8/ch, lm_head float (5,000 bytes with the other outer tensors; "
            "predicted loss 0.0012") in md
    assert "Outside the blocks" not in section([{"name": "m"}], {"m": allocation()})
