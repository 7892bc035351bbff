"""llama.cpp as the GGUF evaluation runtime: the full-logit statistics against the streaming
ones, the fallback to our torch view without llama-cpp-python (and the table saying so), the
preflight refusal of `gguf_runtime: llama.cpp` without it, and (marker `ecosystem`, skipped
without llama_cpp) llama.cpp's logits on a tiny exported GGUF against our torch view."""
from __future__ import annotations

import json

import pytest
import torch

from compress.config import ConfigError, parse_config
from compress.evaluate import llamacpp
from compress.evaluate.vocab_stream import vocab_metrics
from compress.pipeline import preflight, run
from tiny_models import run_config


def test_window_stats_equal_the_streamed_statistics():
    """Full-logit KL/top-1/NLL per window, merged, equal the online log-sum-exp of vocab_stream."""
    g = torch.Generator().manual_seed(0)
    w, L, H, V = 3, 20, 16, 300
    ids = torch.randint(0, V, (w, L), generator=g)
    x, xr = torch.randn(w, L, H, generator=g), torch.randn(w, L, H, generator=g)
    wt, wr = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)

    def head(t):  # slices of 128 rows, as a checkpoint's head is read
        return lambda: ((s, t[s : s + 128], None) for s in range(0, V, 128))

    streamed = vocab_metrics(x, head(wt), ids, None, ref_inputs=xr, ref_head=head(wr))
    full = llamacpp.merge(
        llamacpp.window_stats(x[i] @ wt.T, ids[i], llamacpp.ref_window_logits(xr[i], head(wr), None))
        for i in range(w))
    assert full.tokens == streamed.tokens == w * (L - 1) and full.positions == w * L
    assert full.agree == streamed.agree
    for a, b in ((full.perplexity, streamed.perplexity), (full.kl, streamed.kl),
                 (full.ref_perplexity, streamed.ref_perplexity)):
        assert a == pytest.approx(b, rel=1e-5)
    assert full.kl > 0.1  # two unrelated heads: a KL that a wrong sign or index would change


def test_softcap_is_applied_to_the_original_logits():
    x, w = torch.randn(4, 8), torch.randn(10, 8) * 10
    capped = llamacpp.ref_window_logits(x, lambda: iter([(0, w, None)]), 3.0)
    assert torch.allclose(capped, torch.tanh(x @ w.T / 3.0) * 3.0) and capped.abs().max() <= 3.0


def test_spread_and_paired_ratio_against_numpy():
    import numpy as np

    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 9.0]
    got = llamacpp.spread(xs)
    q1, med, q3 = np.percentile(xs, [25, 50, 75])  # numpy's linear = statistics' inclusive method
    assert (got["q1"], got["median"], got["q3"], got["min"], got["max"]) == pytest.approx((q1, med, q3, 1.0, 9.0))
    assert llamacpp.spread([7.0]) == {"median": 7.0, "q1": 7.0, "q3": 7.0, "min": 7.0, "max": 7.0}
    r = llamacpp.paired_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 4.0])  # per pass: 2, 3, 1
    assert (r["median"], r["min"], r["max"]) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="unpaired"):
        llamacpp.paired_ratio([1.0], [1.0, 2.0])


def test_speed_passes_keep_the_timed_passes_of_one_context(monkeypatch):
    """One context: warm-up passes first and not kept, then one figure per timed pass, in order;
    the context is closed."""
    calls = []

    class Fake:
        def n_vocab(self):
            return 100

        def close(self):
            calls.append("close")

    def one_pass(llm, ids, new):
        calls.append("pass")
        n = calls.count("pass")
        return float(n), 10.0 * n, 100.0 * n

    monkeypatch.setattr(llamacpp, "open_llama", lambda *a, **k: Fake())
    monkeypatch.setattr(llamacpp, "_one_pass", one_pass)
    got = llamacpp.speed_passes("a", prompt=4, new=2, threads=1, passes=3, warmup=2)
    assert got == {"prefill": [3.0, 4.0, 5.0], "decode": [30.0, 40.0, 50.0], "decode_cpu": [300.0, 400.0, 500.0]}
    assert calls == ["pass"] * 5 + ["close"]


def test_alternating_passes_run_a_process_per_pass_a_b_then_b_a(monkeypatch):
    """Every pass is its own child (one timed pass, the warm-up and mapping passed on), round k
    in the files' order when k is even and reversed when odd; each file's lists hold its passes
    in round order."""
    calls = []

    def child(path, prompt, new, threads, passes, warmup, mmap):
        calls.append((path, passes, warmup, mmap))
        k = len(calls)
        return {"prefill": [float(k)], "decode": [10.0 * k], "decode_cpu": [100.0 * k], "serving_peak_rss_mb": 1.0}

    monkeypatch.setattr(llamacpp, "passes_in_subprocess", child)
    got = llamacpp.alternating_passes(["a", "b", "c"], prompt=4, new=2, threads=1, passes=4, warmup=0, mmap=True)
    assert [c[0] for c in calls] == list("abccbaabccba")
    assert {c[1:] for c in calls} == {(1, 0, True)}
    assert [g["decode"] for g in got] == [[10.0, 60.0, 70.0, 120.0], [20.0, 50.0, 80.0, 110.0],
                                          [30.0, 40.0, 90.0, 100.0]]
    assert got[0]["prefill"] == [1.0, 6.0, 7.0, 12.0] and got[2]["decode_cpu"] == [300.0, 400.0, 900.0, 1000.0]


def _gguf_cfg(model_dir, text_file, out, **evaluate):
    return parse_config(run_config(model_dir("llama"), text_file, out, quantize={"bits": 8, "group_size": 32},
                                   evaluate={"dataset": str(text_file), "windows": 2, "seqlen": 32,
                                             "speed": False, **evaluate},
                                   export={"format": "gguf", "gguf_type": "Q8_0"}))


def test_without_llama_cpp_the_torch_view_evaluates_and_the_table_says_so(model_dir, text_file, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    ctx = run(_gguf_cfg(model_dir, text_file, tmp_path / "out"))
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["runtime"] for r in rows] == ["torch", "torch"]
    assert rows[1]["kl_divergence"] < 1e-2
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| candidate | runtime | ppl |" in report and "| torch |" in report
    (res,) = ctx.candidates.values()
    assert res.metrics.runtime == "torch"


def test_llama_cpp_runtime_without_llama_cpp_exits_2_at_preflight(model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    cfg = _gguf_cfg(model_dir, text_file, tmp_path / "out", gguf_runtime="llama.cpp")
    with pytest.raises(ConfigError, match=r"evaluate\.gguf_runtime: llama\.cpp needs llama-cpp-python"):
        preflight(cfg, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"evaluate\.gguf_runtime"):
        _gguf_cfg(model_dir, text_file, tmp_path / "out", gguf_runtime="llamacpp")


# ---- llama.cpp itself -----------------------------------------------------------------------
def _mean_kl(p_logits, q_logits) -> float:
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.ecosystem
@pytest.mark.parametrize("gguf_type,quantize", [
    ("Q8_0", {"bits": 8, "group_size": 32}),
    ("Q4_0", {"bits": 4, "group_size": 32}),
    ("Q4_1", {"method": "gptq", "bits": 4, "group_size": 32, "sym": False}),
])
def test_llama_cpp_logits_agree_with_our_torch_view(gguf_type, quantize, model_dir, text_file, tmp_path):
    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed (bash scripts/build-llamacpp.sh)")
    from compress.formats.artifact import open_artifact
    from tiny_models import walk_logits

    def cfg(out, runtime, speed):
        return parse_config(run_config(model_dir("llama"), text_file, tmp_path / out, quantize=quantize,
                                       evaluate={"dataset": str(text_file), "windows": 2, "seqlen": 32,
                                                 "speed": speed, "speed_prompt_tokens": 16, "speed_new_tokens": 4,
                                                 "gguf_runtime": runtime},
                                       export={"format": "gguf", "gguf_type": gguf_type}))

    ctx = run(cfg("out", "llama.cpp", True))
    (res,) = ctx.candidates.values()
    assert res.error is None and res.metrics.runtime == "llama.cpp"
    assert res.metrics.decode_tokens_per_s > 0 and res.metrics.prefill_tokens_per_s > 0

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    ours = walk_logits(open_artifact(res.artifact, torch.device("cpu"), torch.float32, dense=True), ids)
    llm = llamacpp.open_llama(res.artifact / "model.gguf", 24, 2, logits_all=True)
    try:
        theirs = torch.stack([llamacpp.window_logits(llm, ids[w].tolist()) for w in range(2)])
    finally:
        llm.close()
    # llama.cpp quantizes activations to Q8 blocks for quantized dot products and keeps the F16
    # embedding/head in F16: a kernel tolerance, far below the quantization's own KL
    kl = _mean_kl(ours, theirs)
    assert kl < 2e-3, kl
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9
    # and the pipeline's llama.cpp KL against the original is the torch view's within that tolerance
    (tres,) = run(cfg("torch", "torch", False)).candidates.values()
    assert tres.metrics.runtime == "torch"
    assert res.metrics.kl_divergence == pytest.approx(tres.metrics.kl_divergence, rel=0.2, abs=2e-3)
    assert res.metrics.perplexity == pytest.approx(tres.metrics.perplexity, rel=0.02)
