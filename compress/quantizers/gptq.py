"""GPTQ: column-by-column quantization with second-order error compensation.

Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1. Each column is rounded on the grid of its group and the rounding
error is spread over the not-yet-quantized columns through the inverse Hessian; columns are
processed in blocks whose updates to the rest of the matrix are applied lazily (Sec. 4, step 2)
and the inverse Hessian is read off its upper Cholesky factor (Sec. 4, step 3).

A pure function of tensors: the engine accumulates ``H`` (see ``hessian.py``) and catches
:class:`GPTQNumericalError` (a :class:`NumericalError`) to fall back to RTN. What depends on ``H``
alone (column order, damping, inverse Cholesky factor) is :func:`factor_hessian`; rounding a weight
given that factor is :func:`gptq_factored`, so weights sharing one ``H`` (the lm_head's row slices)
factorise it once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import torch

from pydantic import Field

from compress.formats.qweight import BlockQuantWeight, QuantizedWeight
from compress.quantizers import kgrid
from compress.quantizers.base import (
    CalibratedConfig, LayerStats, NumericalError, QuantResult, QuantSpec, register_method,
)
from compress.quantizers.grid import dequantize, find_params, max_code, quantize

log = logging.getLogger(__name__)

# Cholesky failure: multiply the damping by DAMP_GROWTH, at most MAX_DAMP_TRIES attempts.
DAMP_GROWTH = 10.0
MAX_DAMP_TRIES = 4
# Range shrink factors tried by ``mse_clip`` (1.0 first: ties keep the plain min/max grid).
CLIP_SHRINKS = tuple(1.0 - 0.01 * i for i in range(26))  # 1.00 .. 0.75
CLIP_NORM = 2.0
STATIC_CHUNK = 1 << 18  # weights per slice of the static-group grid search


@dataclass(frozen=True)
class GPTQSpec(QuantSpec):
    """The grid plus GPTQ's options for one layer."""

    damp_percent: float = 0.01
    block_size: int = 128
    desc_act: bool = False
    static_groups: bool = False
    mse_clip: bool = False  # search a shrunk range per group that minimises the error

    @property
    def permutes_columns(self) -> bool:
        # act-order with dynamic groups; static groups keep g_idx = column // group_size
        return self.desc_act and not self.static_groups and self.group_size != -1


class GPTQConfig(CalibratedConfig):
    """GPTQ over the block-streaming engine (defaults: benchmarks/gptq_defaults.yaml)."""

    method: Literal["gptq"] = "gptq"
    # Defaults chosen on SmolLM2-135M W4 g64, 64x512 Wikipedia windows, 16x512 held-out
    # windows: plain GPTQ (damp 0.01) ppl 32.5 / KL 0.435; these defaults 26.5 / 0.214; RTN 30.2 / 0.464.
    desc_act: bool = Field(True, description="Quantize columns in descending Hessian-diagonal order")
    static_groups: bool = Field(True, description="Group grids fixed up front, so g_idx stays in order")
    damp_percent: float = Field(0.05, gt=0, lt=1, description="Damping as a fraction of mean diag(H)")
    block_size: int = Field(128, ge=1)
    mse_clip: bool = Field(True, description="Search a shrunk range per group minimising the error")

    def spec(self, bits: int, group_size: int, sym: bool) -> GPTQSpec:
        return GPTQSpec(
            bits=bits, group_size=group_size, sym=sym, damp_percent=self.damp_percent,
            block_size=self.block_size, desc_act=self.desc_act, static_groups=self.static_groups,
            mse_clip=self.mse_clip,
        )

    def name_parts(self) -> list[str]:
        return ["act"] if self.desc_act and not self.static_groups else []  # a permuted g_idx


class GPTQNumericalError(NumericalError):
    """The damped Hessian stayed non positive definite after every retry."""

    def __init__(self, damp_percents: list[float]) -> None:
        self.damp_percents = damp_percents
        super().__init__(
            "Cholesky factorisation of the damped Hessian failed with damp_percent "
            + ", ".join(f"{d:g}" for d in damp_percents)
            + "; raise quantize.damp_percent or quantize this layer with RTN"
        )


@dataclass(frozen=True)
class GPTQResult:
    weight: Union[QuantizedWeight, BlockQuantWeight]
    loss: float  # the reference's sum over weights of (w - q)^2 / (2 [H^-1]_jj-chol^2)
    damp_percent: float  # the damping actually used (larger than asked after retries)


def clip_search_params(
    x: torch.Tensor,
    bits: int,
    sym: bool,
    weight: Optional[torch.Tensor] = None,
    shrinks: tuple[float, ...] = CLIP_SHRINKS,
    norm: float = CLIP_NORM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero of ``x`` [rows, cols] minimising ``sum weight * |err|^norm``.

    Grid search over a shrunk min/max range, as the GPTQ reference's ``mse`` option and
    llm-compressor's MSE observer do. ``weight`` broadcasts against ``x`` (e.g. diag(H) [cols]).
    """
    best = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    scale = torch.empty_like(best)
    zero = torch.empty_like(best)
    for p in shrinks:
        s, z = find_params(x, bits, sym, shrink=p)
        err = (dequantize(quantize(x, s, z, bits), s, z) - x).abs_().pow_(norm)
        if weight is not None:
            err = err * weight
        err = err.sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _params(x: torch.Tensor, spec: GPTQSpec, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.mse_clip:
        return clip_search_params(x, spec.bits, spec.sym, weight=weight)
    return find_params(x, spec.bits, spec.sym)


def _inverse_cholesky(make_h: Callable[[], torch.Tensor], damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` and the damping used.

    ``make_h()`` returns a fresh copy of ``H`` that may be overwritten: each attempt damps it
    and factorises, inverts and factorises again in that one buffer (LAPACK works in place;
    the results equal the out-of-place calls bit for bit), so a wide MLP projection's
    ``in x in`` matrix is not held three times over."""
    tried: list[float] = []
    damp = damp_percent
    for attempt in range(MAX_DAMP_TRIES):
        tried.append(damp)
        # H is symmetric: its transpose is the same matrix in column-major order, the layout
        # LAPACK works in (no hidden copies), and the layout the out-of-place calls return.
        A = make_h().t()
        A.diagonal().add_(damp * torch.diagonal(A).mean())
        info = torch.zeros((), dtype=torch.int32, device=A.device)
        torch.linalg.cholesky_ex(A, out=(A, info))  # A = L
        if int(info) == 0:
            torch.cholesky_inverse(A, out=A)  # A = H_damped^-1
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))  # A = U
            if int(info) == 0 and bool(torch.isfinite(A).all()):
                return A, damp
        del A
        if attempt + 1 < MAX_DAMP_TRIES:
            log.warning(
                "GPTQ: Cholesky of the Hessian failed with damp_percent=%g; retrying with %g",
                damp, damp * DAMP_GROWTH,
            )
        damp *= DAMP_GROWTH
    raise GPTQNumericalError(tried)


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ takes from ``H`` alone, for one column order and damping: computed once by
    :func:`factor_hessian`, it rounds any weight with those inputs (:func:`gptq_factored`), e.g.
    every row slice of an lm_head, whose rows are independent given ``H``."""

    hinv: torch.Tensor  # upper Cholesky factor of the damped H^-1 [in, in], in processing order
    hdiag: torch.Tensor  # diag(H) [in], dead inputs set to 1, in the original column order
    dead: torch.Tensor  # [in] bool: inputs never active in calibration
    perm: torch.Tensor  # processing order: descending diag(H) under desc_act, else the identity
    desc_act: bool
    damp_percent: float  # the damping actually used (larger than asked after retries)


def factor_hessian(H: torch.Tensor, spec: GPTQSpec, dtype: torch.dtype = torch.float32,
                   device: Optional[torch.device] = None) -> HessianFactor:
    """Column order, damping and inverse Cholesky factor of ``H`` [in, in] for `spec`, in
    `dtype` on `device` (``H``'s own by default): the ``O(in^3)`` part of GPTQ.
    Raises :class:`GPTQNumericalError` when no damping makes ``H`` factorise."""
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"Hessian {tuple(H.shape)} is not square")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("Hessian contains NaN or Inf (check the calibration activations)")
    device = H.device if device is None else device
    # Dead inputs (never active in calibration): any value is free, so the weights fix them to 0
    # and H gets a unit diagonal there to stay invertible (GPTQ reference, `fasterquant`).
    dead = (torch.diagonal(H) == 0).to(device)
    hdiag = torch.diagonal(H).to(device=device, dtype=dtype).clone()
    hdiag[dead] = 1.0
    # Act-order (the reference's `actorder`): quantize columns of large H_jj first.
    if spec.desc_act:
        perm = torch.argsort(hdiag, descending=True)
    else:
        perm = torch.arange(H.shape[0], device=device)

    def working_hessian() -> torch.Tensor:
        """H in processing order, dead diagonal set to 1: a fresh copy each call."""
        Hw = H.to(device=device, dtype=dtype)
        # One gather (broadcast indices), not H[perm][:, perm]'s two full copies.
        Hw = Hw[perm[:, None], perm] if spec.desc_act else Hw.clone()
        dp = dead[perm]
        Hw[dp, dp] = 1.0
        return Hw

    hinv, damp = _inverse_cholesky(working_hessian, spec.damp_percent)
    return HessianFactor(hinv, hdiag, dead, perm, spec.desc_act, damp)


def gptq(W: torch.Tensor, H: torch.Tensor, spec: GPTQSpec) -> GPTQResult:
    """Quantize ``W`` [out, in] given the Hessian ``H`` [in, in] of its inputs.

    Runs on ``W``'s device, in float64 when ``W`` is float64 and float32 otherwise. Codes and
    ``g_idx`` come back in the layer's original column order, also under ``desc_act``.
    """
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"weight {tuple(W.shape)} and Hessian {tuple(H.shape)} do not match")
    _check_weight(W, spec)
    return _round(W, factor_hessian(H, spec, _work_dtype(W), W.device), spec)


def gptq_factored(W: torch.Tensor, factor: HessianFactor, spec: GPTQSpec) -> GPTQResult:
    """:func:`gptq` with the Hessian's part done beforehand (`factor_hessian` with `spec`, in the
    dtype and on the device ``W`` is worked in): the same result, bit for bit."""
    in_f = factor.hinv.shape[0]
    if W.ndim != 2 or W.shape[1] != in_f:
        raise ValueError(f"weight {tuple(W.shape)} and Hessian factor [{in_f}, {in_f}] do not match")
    if factor.desc_act != spec.desc_act:
        raise ValueError(f"the Hessian factor was made with desc_act={factor.desc_act}, the spec has {spec.desc_act}")
    if (factor.hinv.dtype, factor.hinv.device) != (_work_dtype(W), W.device):
        raise ValueError(f"the Hessian factor is {factor.hinv.dtype} on {factor.hinv.device}; this weight is "
                         f"worked in {_work_dtype(W)} on {W.device}")
    _check_weight(W, spec)
    return _round(W, factor, spec)


def _work_dtype(W: torch.Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _check_weight(W: torch.Tensor, spec: GPTQSpec) -> None:
    if not bool(torch.isfinite(W).all()):
        raise ValueError("weight contains NaN or Inf")
    if not 2 <= spec.bits <= 8:
        raise ValueError(f"quantize.bits: {spec.bits} is outside 2..8")
    in_f = W.shape[1]
    gs = in_f if spec.group_size == -1 else spec.group_size
    if in_f % gs:
        raise ValueError(f"quantize.group_size: {gs} does not divide the input size {in_f}")


def _round(W: torch.Tensor, factor: HessianFactor, spec: GPTQSpec) -> GPTQResult:
    """Algorithm 1 on ``W`` given the Hessian's factor (inputs checked by the callers)."""
    out_f, in_f = W.shape
    gs = in_f if spec.group_size == -1 else spec.group_size
    n_groups = in_f // gs
    dtype = _work_dtype(W)
    device = W.device
    maxq = max_code(spec.bits)

    W = W.to(dtype).clone()
    W[:, factor.dead] = 0.0
    hdiag, perm, Hinv = factor.hdiag, factor.perm, factor.hinv

    # Static groups (and per-channel grids) are fixed from the unquantized weight up front;
    # otherwise each group's grid is chosen from the error-updated weights when reached.
    static = spec.static_groups or spec.group_size == -1 or spec.gguf_grid is not None
    scales = torch.zeros(out_f, n_groups, dtype=dtype, device=device)
    zeros = torch.zeros_like(scales)
    kg = kparams = None
    if spec.gguf_grid is not None:
        # A GGUF block grid is fixed up front, like static groups: sub-block scales/mins fitted
        # with diag(H) weighting the range search, quantized against the block's d/dmin.
        kg = kgrid.get_grid(spec.gguf_grid)
        kparams = kgrid.fit(W, kg, weight=hdiag.float())
        ks, km = (t.repeat_interleave(kg.sub, dim=1).to(dtype) for t in kparams.effective(kg))
    elif static:
        # A few groups at a time: the grid search's temporaries stay small for wide layers.
        step = max(1, STATIC_CHUNK // (out_f * gs))
        for g0 in range(0, n_groups, step):
            k = min(step, n_groups - g0)
            cols = slice(g0 * gs, (g0 + k) * gs)
            flat = W[:, cols].reshape(out_f, k, gs).transpose(0, 1).reshape(-1, gs)
            wgt = hdiag[cols].reshape(k, 1, gs).expand(k, out_f, gs).reshape(-1, gs)
            s, z = _params(flat, spec, wgt)
            scales[:, g0 : g0 + k] = s.reshape(k, out_f).t()
            zeros[:, g0 : g0 + k] = z.reshape(k, out_f).t()

    if spec.desc_act:
        W = W[:, perm]
        hdiag = hdiag[perm]
        if kg is not None:
            ks, km = ks[:, perm], km[:, perm]
    # Group of each position in processing order: static groups keep the original column's
    # group, dynamic groups are consecutive runs of processing order.
    group_of = perm // gs if static else torch.arange(in_f, device=device) // gs
    group_list = group_of.tolist()
    damp = factor.damp_percent

    Q = torch.zeros(W.shape, dtype=torch.uint8, device=device)  # codes fit 8 bits
    loss = torch.zeros((), dtype=dtype, device=device)
    bs = spec.block_size
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % gs == 0:
                # Current values of the group: in-block columns already carry this block's
                # updates; columns past the block still owe the pending lazy update.
                cur = W1[:, i : i + gs]
                if j + gs > i2:
                    rest = W[:, i2 : j + gs] - Err1 @ Hinv[i1:i2, i2 : j + gs]
                    cur = torch.cat([cur, rest], dim=1)
                g = j // gs
                scales[:, g], zeros[:, g] = _params(cur, spec, hdiag[j : j + gs])
            w = W1[:, i]
            d = Hinv1[i, i]
            if kg is not None:  # the nearest level under the column's fixed sub-block grid
                q = kgrid.codes_for(w, ks[:, j], km[:, j], kg)
                Q[:, j] = q.to(torch.uint8)
                err = (w - (ks[:, j] * kg.values(q, dtype) - km[:, j])) / d
            else:
                g = group_list[j]
                s, z = scales[:, g], zeros[:, g]
                q = torch.clamp(torch.round(w / s) + z, 0, maxq)
                Q[:, j] = q
                err = (w - s * (q - z)) / d
            loss += (err * err).sum() / 2  # Algorithm 1 with the reference's loss bookkeeping
            # Eq. (3) on the Cholesky row: W[:, j+1:] -= err * Hinv[j, j+1:]
            W1[:, i + 1 :].addr_(err, Hinv1[i, i + 1 :], alpha=-1)
            Err1[:, i] = err
        # Lazy batch update of every later column at once (Sec. 4, step 2).
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    inv = torch.argsort(perm)
    if kg is not None:
        p = kparams
        return GPTQResult(BlockQuantWeight(kg.name, Q[:, inv], p.d, p.dmin, p.sc, p.m), float(loss), damp)
    g_idx = group_of[inv].to(torch.int32)
    qw = QuantizedWeight(
        codes=Q[:, inv],
        scales=scales.float(),
        zeros=zeros.to(torch.uint8),
        g_idx=g_idx,
        bits=spec.bits,
        group_size=spec.group_size,
        sym=spec.sym,
        # Flag only a g_idx that readers cannot infer (act-order with static groups keeps
        # the plain i // group_size layout).
        desc_act=spec.desc_act and not static,
    )
    return GPTQResult(weight=qw, loss=float(loss), damp_percent=damp)


@register_method("gptq", GPTQConfig, stats="hessian")
def quantize_weight(W: torch.Tensor, stats: LayerStats, spec: GPTQSpec) -> QuantResult:
    if stats.hessian is None:
        raise ValueError("gptq needs the layer's Hessian; calibration did not provide one")
    res = gptq(W, stats.hessian, spec)
    if res.damp_percent != spec.damp_percent:  # the damping the retries settled on
        spec = GPTQSpec(**{**spec.__dict__, "damp_percent": res.damp_percent})
    return QuantResult(res.weight, spec)
