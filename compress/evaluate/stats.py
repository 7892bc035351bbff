"""How sure a quality figure is: intervals over evaluation windows and KL percentiles.

Tokens of one window are not independent draws (a hard paragraph is hard for every token), so
the uncertainty of a mean is taken over windows: each window's mean (they hold equally many
positions), their standard error ``sd / sqrt(W)`` and a 95% interval of ``mean +- 1.96 se``.
Perplexity's interval is ``exp`` of its mean NLL's; a candidate's perplexity ratio to the
original is paired by window (the same text scored by both), which cancels most of the text's
own variance: that is the interval to read when asking whether a candidate is really worse.
KL percentiles (median, 99%, 99.9%, max) are over every position, as llama.cpp's
``--kl-divergence`` reports them (linear interpolation between order statistics); so is "same
top-1".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Interval:
    mean: float
    se: float  # standard error of the mean over windows
    windows: int

    @property
    def ci95(self) -> tuple[float, float]:
        return (self.mean - Z95 * self.se, self.mean + Z95 * self.se)


def over_windows(per_position: torch.Tensor) -> Interval:
    """Mean and its standard error over the windows (rows) of `per_position` [W, L], NaN
    entries (positions without a value) left out of each window's mean."""
    v = per_position.double()
    ok = ~torch.isnan(v)
    means = torch.where(ok, v, torch.zeros_like(v)).sum(1) / ok.sum(1)
    w = means.numel()
    se = float(means.std(unbiased=True)) / math.sqrt(w) if w > 1 else math.nan
    # Equal positions per window: the mean of window means is the mean over positions.
    return Interval(float(v[ok].mean()), se, w)


def percentile(values: torch.Tensor, q: float) -> float:
    """llama.cpp's percentile: linear interpolation between the sorted values."""
    return float(torch.quantile(values.double().flatten(), q))


@dataclass(frozen=True)
class QualityStats:
    """The run's quality figures with their uncertainty (None where there is no reference)."""

    perplexity_ci95: tuple[float, float]
    nll_se: float
    kl_divergence_se: Optional[float] = None
    kl_median: Optional[float] = None
    kl_p99: Optional[float] = None
    kl_p999: Optional[float] = None
    kl_max: Optional[float] = None
    top1_agreement_se: Optional[float] = None
    ppl_ratio: Optional[float] = None  # PPL(candidate) / PPL(reference)
    ppl_ratio_ci95: Optional[tuple[float, float]] = None

    def as_metrics(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items() if v is not None}


def quality_stats(nll: torch.Tensor, kl: Optional[torch.Tensor] = None, same_top1: Optional[torch.Tensor] = None,
                  ref_nll: Optional[torch.Tensor] = None) -> QualityStats:
    """From per-position values [W, L] (`vocab_stream.VocabStats`): NLL (NaN where no target),
    KL(reference || model), same argmax (bool), and the reference's NLL on the same positions."""
    n = over_windows(nll)
    lo, hi = n.ci95
    out = dict(perplexity_ci95=(math.exp(lo), math.exp(hi)), nll_se=n.se)
    if kl is not None:
        out.update(kl_divergence_se=over_windows(kl).se, kl_median=percentile(kl, 0.5), kl_p99=percentile(kl, 0.99),
                   kl_p999=percentile(kl, 0.999), kl_max=float(kl.max()))
    if same_top1 is not None:
        out["top1_agreement_se"] = over_windows(same_top1.double()).se
    if ref_nll is not None:
        d = over_windows(nll.double() - ref_nll.double())  # paired: the same positions
        lo, hi = d.ci95
        out.update(ppl_ratio=math.exp(d.mean), ppl_ratio_ci95=(math.exp(lo), math.exp(hi)))
    return QualityStats(**out)
