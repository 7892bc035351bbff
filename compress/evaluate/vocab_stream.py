"""Perplexity, KL divergence and top-1 agreement with the head read a slice of vocabulary at a time.

The embedding and lm_head are the largest tensors of a small model (SmolLM2's tied 49152 x 576
table is 21% of it), and a full-vocabulary logit pass touches every row of both models' heads,
so both would stay resident through evaluation. Here each head is read from its checkpoint in
slices of rows; every position keeps a running log-sum-exp (the online softmax of Milakov &
Gimelshein, 2018), its target's logit, its running argmax and, against the original, the running
sum of ``exp(a - m) * (a - b)``, from which

    KL(P || Q) = sum_i p_i (a_i - b_i) - lse(a) + lse(b),  p_i = exp(a_i - lse(a))

for original logits ``a`` and candidate logits ``b``. Only head inputs (one hidden vector per
position) and a slice of logits are ever in memory. The per-position values (NLL, KL, same
argmax: windows x seqlen numbers each) are kept for the statistics of `compress.evaluate.stats`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

ROWS = 4096  # vocabulary rows of a head slice
POSITIONS = 256  # positions per logit tile: ROWS x POSITIONS floats (4 MB) per model

# start row -> (weight rows [r, hidden] in the compute dtype, bias rows [r] or None)
HeadSlices = Callable[[], Iterator[tuple[int, torch.Tensor, Optional[torch.Tensor]]]]


class _Running:
    """Per-position running max, sum of exp(x - max), argmax and target logit of one model."""

    def __init__(self, n: int, device: torch.device):
        self.m = torch.full((n,), -math.inf, dtype=torch.float32, device=device)
        self.s = torch.zeros(n, dtype=torch.float32, device=device)
        self.arg = torch.zeros(n, dtype=torch.long, device=device)
        self.target = torch.zeros(n, dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor, start: int, tgt: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold logits ``x`` [p, r] for vocabulary rows ``start..start+r`` into positions `sl`;
        returns the factor ``exp(m_old - m_new)`` that rescales sums taken against the old
        running max, and ``exp(x - m_new)`` (the caller may overwrite it)."""
        m_old = self.m[sl].clone()
        cmax, cidx = x.max(dim=1)
        m_new = torch.maximum(m_old, cmax)
        rescale = torch.exp(m_old - m_new)
        e = x.sub(m_new[:, None]).exp_()
        self.s[sl] = self.s[sl] * rescale + e.sum(1)
        # Strictly greater: ties keep the earlier row, as torch.argmax keeps the first maximum.
        self.arg[sl] = torch.where(cmax > m_old, cidx + start, self.arg[sl])
        self.m[sl] = m_new
        local = tgt - start
        hit = (local >= 0) & (local < x.shape[1])
        picked = x.gather(1, local.clamp(0, x.shape[1] - 1)[:, None])[:, 0]
        self.target[sl] = torch.where(hit, picked, self.target[sl])
        return rescale, e

    @property
    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)


@dataclass
class VocabStats:
    nll_sum: float
    tokens: int  # positions with a next token (perplexity)
    kl_sum: Optional[float] = None
    agree: Optional[int] = None
    positions: int = 0  # every position (KL, top-1)
    ref_nll_sum: Optional[float] = None  # the reference's own NLL, from the same logit tiles
    # Per position, [windows, L] float32 on the CPU: the next token's NLL (NaN at a window's last
    # position), KL(reference || model), whether both argmaxes agree, the reference's NLL.
    nll: Optional[torch.Tensor] = None
    kl_tokens: Optional[torch.Tensor] = None
    same_top1: Optional[torch.Tensor] = None
    ref_nll: Optional[torch.Tensor] = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def ref_perplexity(self) -> Optional[float]:
        return None if self.ref_nll_sum is None else math.exp(self.ref_nll_sum / self.tokens)

    @property
    def kl(self) -> Optional[float]:
        return None if self.kl_sum is None else self.kl_sum / self.positions

    @property
    def top1(self) -> Optional[float]:
        return None if self.agree is None else self.agree / self.positions


def _softcap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    # Gemma 2/3: logits = cap * tanh(logits / cap), applied by the model after lm_head.
    return x if not cap else torch.tanh(x / cap) * cap


def vocab_metrics(
    inputs: torch.Tensor, head: HeadSlices, input_ids: torch.Tensor, softcap: Optional[float] = None,
    ref_inputs: Optional[torch.Tensor] = None, ref_head: Optional[HeadSlices] = None,
    ref_softcap: Optional[float] = None,
) -> VocabStats:
    """Perplexity of the model whose head inputs are ``inputs`` [windows, L, hidden] on
    ``input_ids`` [windows, L]; with ``ref_*``, also KL(reference || model), top-1 agreement
    and the reference's own perplexity (its logits are computed anyway).

    Position p of a window predicts token p+1 (the last position has no target); KL and
    agreement count every position. Both heads must enumerate the same vocabulary rows.
    """
    w, L = input_ids.shape
    x = inputs.reshape(w * L, -1)
    dev = x.device
    n = w * L
    # Targets: the next token; the window's last position gets -1 (never hit) and no NLL.
    nxt = torch.full((w, L), -1, dtype=torch.long)
    nxt[:, :-1] = input_ids[:, 1:]
    tgt = nxt.reshape(-1).to(dev)
    cand = _Running(n, dev)
    pair = ref_inputs is not None
    if pair:
        xr = ref_inputs.reshape(n, -1)
        ref = _Running(n, dev)
        t = torch.zeros(n, dtype=torch.float32, device=dev)  # sum exp(a - m_a) * (a - b)
        slices = zip(head(), ref_head(), strict=True)  # a vocabulary size mismatch raises
    else:
        slices = ((h, None) for h in head())
    for (start, wt, bias), rslice in slices:
        if pair:
            rstart, rwt, rbias = rslice
            if rstart != start or rwt.shape[0] != wt.shape[0]:
                raise ValueError(f"the two heads' vocabulary slices differ at row {start}")
        for p0 in range(0, n, POSITIONS):
            sl = slice(p0, min(p0 + POSITIONS, n))
            b = _softcap(torch.nn.functional.linear(x[sl], wt, bias).float(), softcap)
            cand.update(b, start, tgt[sl], sl)  # its exp tile is dropped at once
            if pair:
                a = _softcap(torch.nn.functional.linear(xr[sl], rwt, rbias).float(), ref_softcap)
                rescale, e = ref.update(a, start, tgt[sl], sl)
                t[sl] = t[sl] * rescale + e.mul_(a.sub_(b)).sum(1)  # a is spent: overwritten
    has = tgt >= 0
    lse = cand.lse

    def per_position(v: torch.Tensor, scored_only: bool = False) -> torch.Tensor:
        v = v.float().cpu()
        return (torch.where(has.cpu(), v, torch.full_like(v, math.nan)) if scored_only else v).reshape(w, L)

    stats = VocabStats(float((lse - cand.target)[has].double().sum()), int(has.sum()), positions=n,
                       nll=per_position(lse - cand.target, True))
    if pair:
        kl = t / ref.s - ref.lse + lse
        same = ref.arg == cand.arg
        stats.kl_sum = float(kl.double().sum())
        stats.agree = int(same.sum())
        stats.ref_nll_sum = float((ref.lse - ref.target)[has].double().sum())
        stats.kl_tokens, stats.same_top1 = per_position(kl), per_position(same)
        stats.ref_nll = per_position(ref.lse - ref.target, True)
    return stats


def kl_divergences(ref_inputs: torch.Tensor, inputs: list[torch.Tensor], head: HeadSlices,
                   softcap: Optional[float] = None,
                   weights: Optional[list[Callable[[torch.Tensor], torch.Tensor]]] = None) -> list[float]:
    """Mean KL(reference || model), over every position, for several models that share the
    reference's head and differ only in their head inputs (each ``[windows, L, hidden]``, as
    ``ref_inputs``): the head is read once and the reference's logits computed once per tile,
    so n models cost n + 1 logit passes instead of 2n (`compress.mixed.block_kl`). With
    `weights`, model i's head rows are ``weights[i](rows)`` instead (a quantized head's)."""
    xr = ref_inputs.reshape(-1, ref_inputs.shape[-1])
    xs = [x.reshape(xr.shape) for x in inputs]
    n, dev = xr.shape[0], xr.device
    none = torch.full((n,), -1, dtype=torch.long, device=dev)  # no targets: KL needs none
    ref = _Running(n, dev)
    cands = [_Running(n, dev) for _ in xs]
    ts = [torch.zeros(n, dtype=torch.float32, device=dev) for _ in xs]  # sum exp(a - m_a) (a - b)
    for start, wt, bias in head():
        wts = [wt] * len(xs) if weights is None else [f(wt) for f in weights]
        for p0 in range(0, n, POSITIONS):
            sl = slice(p0, min(p0 + POSITIONS, n))
            a = _softcap(torch.nn.functional.linear(xr[sl], wt, bias).float(), softcap)
            rescale, e = ref.update(a, start, none[sl], sl)
            for x, w, c, t in zip(xs, wts, cands, ts):
                b = _softcap(torch.nn.functional.linear(x[sl], w, bias).float(), softcap)
                c.update(b, start, none[sl], sl)
                t[sl] = t[sl] * rescale + (e * (a - b)).sum(1)
    return [float((t / ref.s - ref.lse + c.lse).double().mean()) for c, t in zip(cands, ts)]


def sampled_log_prob_grad(x: torch.Tensor, head: HeadSlices, softcap: Optional[float],
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For head inputs ``x`` [n, hidden]: a label per position drawn from the model's own
    distribution (Gumbel-max, a vocabulary slice at a time), and the gradient at ``x`` of the
    sum of their log-probabilities, ``sum_v (1[v = y] - p_v) dlogit_v/dx`` -- whose outer
    product in expectation over the labels is the Fisher information, the Hessian of the KL
    from the model (`compress.mixed.fisher`). Two passes over the head: the log-sum-exp and the
    label, then the gradient."""
    n, dev = x.shape[0], x.device
    run = _Running(n, dev)
    none = torch.full((n,), -1, dtype=torch.long, device=dev)
    best = torch.full((n,), -math.inf, device=dev)
    label = torch.zeros(n, dtype=torch.long, device=dev)
    for start, wt, bias in head():
        a = _softcap(torch.nn.functional.linear(x, wt, bias).float(), softcap)
        run.update(a, start, none, slice(None))
        u = torch.rand(a.shape, generator=generator).clamp_(1e-20, 1.0).to(dev)
        v, j = (a - torch.log(-torch.log(u))).max(dim=1)
        label = torch.where(v > best, j + start, label)
        best = torch.maximum(best, v)
    lse = run.lse
    grad = torch.zeros_like(x, dtype=torch.float32)
    for start, wt, bias in head():
        z = torch.nn.functional.linear(x, wt, bias).float()
        coef = -torch.exp(_softcap(z, softcap) - lse[:, None])
        local = label - start
        hit = (local >= 0) & (local < z.shape[1])
        coef[hit, local[hit]] += 1.0
        if softcap:  # d/dz of cap * tanh(z / cap)
            coef *= 1 - torch.tanh(z / softcap) ** 2
        grad += coef @ wt.float()
    return grad.to(x.dtype), label
