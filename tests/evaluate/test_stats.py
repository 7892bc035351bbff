"""Intervals over windows and KL percentiles, from the streamed per-position values, equal a
slow computation from full-vocabulary logits written here with the standard library."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from compress.evaluate.stats import Z95, over_windows, percentile, quality_stats
from compress.evaluate.vocab_stream import vocab_metrics


def slices_of(W: torch.Tensor, rows: int):
    return lambda: ((s, W[s : s + rows], None) for s in range(0, W.shape[0], rows))


def _pct(xs: list[float], q: float) -> float:
    """Linear interpolation between order statistics (llama.cpp's `percentile`)."""
    xs = sorted(xs)
    p = q * (len(xs) - 1)
    i = int(p)
    return xs[i] + (p - i) * (xs[min(i + 1, len(xs) - 1)] - xs[i])


def test_streamed_statistics_equal_a_slow_computation() -> None:
    g = torch.Generator().manual_seed(3)
    w, L, H, V = 6, 11, 8, 40
    x, xr = torch.randn(w, L, H, generator=g), torch.randn(w, L, H, generator=g)
    W, Wr = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (w, L), generator=g)
    st = vocab_metrics(x, slices_of(W, 9), ids, ref_inputs=xr, ref_head=slices_of(Wr, 9))
    qs = quality_stats(st.nll, st.kl_tokens, st.same_top1, st.ref_nll)

    lq, lp = F.log_softmax(F.linear(x, W).double(), -1), F.log_softmax(F.linear(xr, Wr).double(), -1)
    kl = [[float((lp[i, j].exp() * (lp[i, j] - lq[i, j])).sum()) for j in range(L)] for i in range(w)]
    nll = [[-float(lq[i, j, ids[i, j + 1]]) for j in range(L - 1)] for i in range(w)]
    rnll = [[-float(lp[i, j, ids[i, j + 1]]) for j in range(L - 1)] for i in range(w)]
    same = [[float(lq[i, j].argmax() == lp[i, j].argmax()) for j in range(L)] for i in range(w)]

    def se(rows):
        return statistics.stdev([statistics.fmean(r) for r in rows]) / math.sqrt(len(rows))

    flat_kl = [v for r in kl for v in r]
    assert st.kl == pytest.approx(statistics.fmean(flat_kl), rel=1e-4)
    assert qs.kl_divergence_se == pytest.approx(se(kl), rel=1e-3)
    for q, got in ((0.5, qs.kl_median), (0.99, qs.kl_p99), (0.999, qs.kl_p999), (1.0, qs.kl_max)):
        assert got == pytest.approx(_pct(flat_kl, q), rel=1e-3, abs=1e-6)
    assert qs.top1_agreement_se == pytest.approx(se(same), rel=1e-6)
    mean_nll = statistics.fmean([v for r in nll for v in r])
    lo, hi = qs.perplexity_ci95
    assert lo == pytest.approx(math.exp(mean_nll - Z95 * se(nll)), rel=1e-4)
    assert hi == pytest.approx(math.exp(mean_nll + Z95 * se(nll)), rel=1e-4)
    diff = [[a - b for a, b in zip(ra, rb)] for ra, rb in zip(nll, rnll)]
    d = statistics.fmean([v for r in diff for v in r])
    assert qs.ppl_ratio == pytest.approx(st.perplexity / st.ref_perplexity, rel=1e-5)
    assert qs.ppl_ratio_ci95[0] == pytest.approx(math.exp(d - Z95 * se(diff)), rel=1e-4)
    assert qs.ppl_ratio_ci95[1] == pytest.approx(math.exp(d + Z95 * se(diff)), rel=1e-4)


def test_window_means_leave_out_missing_positions() -> None:
    v = torch.tensor([[1.0, 3.0, math.nan], [5.0, 7.0, math.nan]])
    iv = over_windows(v)
    assert iv.mean == 4.0 and iv.windows == 2
    assert iv.se == pytest.approx(statistics.stdev([2.0, 6.0]) / math.sqrt(2))
    assert percentile(torch.arange(11.0), 0.95) == pytest.approx(9.5)


def test_identical_models_have_no_divergence_and_a_ratio_of_one() -> None:
    g = torch.Generator().manual_seed(4)
    x, W = torch.randn(4, 9, 8, generator=g), torch.randn(30, 8, generator=g)
    ids = torch.randint(0, 30, (4, 9), generator=g)
    st = vocab_metrics(x, slices_of(W, 7), ids, ref_inputs=x, ref_head=slices_of(W, 7))
    qs = quality_stats(st.nll, st.kl_tokens, st.same_top1, st.ref_nll)
    assert qs.kl_max < 1e-5 and qs.top1_agreement_se == 0.0
    assert qs.ppl_ratio == pytest.approx(1.0) and qs.ppl_ratio_ci95 == pytest.approx((1.0, 1.0))


def test_a_run_reports_the_intervals_everywhere(model_dir, text_file, tmp_path) -> None:
    import json

    from compress.config import parse_config
    from compress.pipeline import run
    from tiny_models import run_config

    out = tmp_path / "out"
    cfg = parse_config(run_config(model_dir("llama"), text_file, out, quantize={"bits": 3, "group_size": 64},
                                  evaluate={"windows": 6}))
    ctx = run(cfg, out)
    rows = json.loads((out / "results.json").read_text())["rows"]
    orig, cand = rows
    lo, hi = orig["perplexity_ci95"]
    assert lo < orig["perplexity"] < hi and "kl_p99" not in orig
    assert cand["kl_median"] <= cand["kl_p99"] <= cand["kl_p999"] <= cand["kl_max"]
    assert cand["kl_divergence_se"] > 0 and 0 <= cand["top1_agreement_se"] < 1
    assert cand["ppl_ratio"] == pytest.approx(cand["perplexity"] / orig["perplexity"], rel=1e-6)
    r_lo, r_hi = cand["ppl_ratio_ci95"]
    assert r_lo < cand["ppl_ratio"] < r_hi
    report = (out / "report.md").read_text()
    assert "ppl 95% CI" in report and "KL p99.9" in report
    art = next(iter(ctx.candidates.values())).artifact
    sealed = json.loads((art / "compress-results.json").read_text())["rows"]
    assert sealed[1]["kl_p999"] == cand["kl_p999"]
