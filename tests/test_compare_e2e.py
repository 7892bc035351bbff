"""A sweep end to end on a tiny Llama: shared work, a failed candidate, and every report file.

The tiny model's attention inputs are 128 wide, so group size 256 cannot divide them: that
candidate must be recorded as failed with its error while the others complete.
"""
from __future__ import annotations

import csv
import json

import pytest

from compress.config import parse_config
from compress.pipeline import run
from tiny_models import run_config

SWEEP = {"bits": [8, 4], "group_size": [-1, 64, 256]}


@pytest.fixture(scope="module")
def sweep_run(model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    cfg = parse_config(run_config(
        model_dir("llama"), text_file, out, sweep=SWEEP, report={"print": False, "html": True},
        select={"max_kl": 0.05}, serving={"context_length": 1000, "batch": 2, "overhead_gb": 0.25},
    ))
    return run(cfg), out


def test_sweep_runs_every_combination_and_records_the_failure(sweep_run):
    ctx, out = sweep_run
    assert list(ctx.candidates) == [
        "rtn-w8-ch", "rtn-w8-g64", "rtn-w8-g256", "rtn-w4-ch", "rtn-w4-g64", "rtn-w4-g256"]
    failed = {n for n, r in ctx.candidates.items() if r.error}
    assert failed == {"rtn-w8-g256", "rtn-w4-g256"}
    assert "256" in ctx.candidates["rtn-w4-g256"].error
    for n, r in ctx.candidates.items():
        if n not in failed:
            assert (out / n / "compress-manifest.json").is_file()
            assert r.metrics.kl_divergence >= 0
    comp = json.loads((out / "comparison.json").read_text())
    rows = {r["name"]: r for r in comp["rows"]}
    assert rows["rtn-w4-g256"]["status"] == "failed" and "256" in rows["rtn-w4-g256"]["error"]
    assert "perplexity" not in rows["rtn-w4-g256"]
    assert rows["rtn-w8-ch"]["status"] == "ok"


def test_every_report_file_is_written(sweep_run):
    _, out = sweep_run
    for name in ("comparison.json", "comparison.csv", "comparison.md", "report.html",
                 "tradeoff.png", "layer_errors.png", "memory.png"):
        assert (out / name).stat().st_size > 0, name
    for png in ("tradeoff.png", "layer_errors.png", "memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows][0] == "original" and len(rows) == 7
    assert {r["name"] for r in rows if r["status"] == "failed"} == {"rtn-w8-g256", "rtn-w4-g256"}
    md = (out / "comparison.md").read_text()
    assert "FAILED" in md and "select:" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table class='sortable'" in html
    assert "http://" not in html and "https://" not in html  # nothing to fetch: opens offline


def test_recommendation_and_serving_columns(sweep_run):
    ctx, out = sweep_run
    comp = json.loads((out / "comparison.json").read_text())
    rows = {r["name"]: r for r in comp["rows"]}
    ok = [r for r in comp["rows"][1:] if r["status"] == "ok"]
    inside = [r for r in ok if r["kl_divergence"] <= 0.05]
    assert inside, "the tiny model's 8-bit candidates should be within KL 0.05"
    assert comp["recommendation"]["name"] == min(inside, key=lambda r: r["bytes"])["name"]
    # tiny Llama: 2 layers x 2 KV heads x head_dim 32; context 1000, batch 2, float16
    assert rows["rtn-w4-g64"]["kv_cache_bytes"] == 2 * 2 * 2 * 32 * 1000 * 2 * 2
    assert rows["rtn-w4-g64"]["overhead_bytes"] == 2**28
    assert rows["rtn-w4-g64"]["weights_bytes"] < rows["rtn-w4-g64"]["bytes"]  # headers excluded
    assert rows["rtn-w4-g64"]["fits_on"][0].startswith("8 GB")


def test_shared_work_is_done_once(model_dir, text_file, tmp_path, monkeypatch):
    """Tokenization of the evaluation windows and the original's final hidden states happen
    once for three candidates, not once per candidate."""
    import compress.data.draw as draw
    import compress.stages.evaluate as ev

    calls = {"eval_windows": 0, "final_hidden": []}
    real_draw, real_hidden = draw.draw_windows, ev.head_inputs

    def count_windows(root, calibration, evaluation, *a, **k):  # windows are drawn in a child
        calls["eval_windows"] += evaluation is not None
        return real_draw(root, calibration, evaluation, *a, **k)

    def count_hidden(sm, ids, desc):
        calls["final_hidden"].append(desc)
        return real_hidden(sm, ids, desc)

    monkeypatch.setattr(draw, "draw_windows", count_windows)
    monkeypatch.setattr(ev, "head_inputs", count_hidden)
    cfg = parse_config(run_config(model_dir("llama"), text_file, tmp_path / "o",
                                  sweep={"bits": [8, 4, 3], "group_size": [64]}))
    run(cfg)
    assert calls["eval_windows"] == 1
    assert sorted(calls["final_hidden"]) == sorted(["original", "rtn-w8-g64", "rtn-w4-g64", "rtn-w3-g64"])
