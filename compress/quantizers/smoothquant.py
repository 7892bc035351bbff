"""SmoothQuant W8A8: migrate activation outliers into the weights, then int8 weights and
dynamic per-token int8 activations.

Xiao et al., 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", Eq. 4: per input channel ``j`` of the linears fed by one smooth layer,
``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``, with ``max|X_j|`` over the calibration tokens
and ``max|W_j|`` over the output rows of every balance linear (llm-compressor's
``SmoothQuantModifier``). ``1/s`` is folded into the smooth layer (a norm's weight or a linear's
output rows) and ``s`` into the balance linears' input columns through the same
``ScaleMapping`` data AWQ uses (``compress.models.arch``), which leaves the block's function
unchanged before quantization.

The rescaled weights are then rounded per output channel to symmetric int8 (round to nearest,
or GPTQ with ``rounding: gptq``); every quantized linear's input is quantized at run time per
token (``ActivationScheme``), which the exported artifact records and our loader simulates.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from compress.quantizers.folding import fold_checked, live_mappings, weight_of
from compress.quantizers.base import (
    ActivationScheme, BlockView, CalibratedConfig, LayerStats, QuantResult, QuantSpec, StatKind,
    register_method,
)
from compress.quantizers.gptq import GPTQSpec, gptq
from compress.quantizers.rtn import round_to_nearest

log = logging.getLogger(__name__)

W8A8 = ActivationScheme(bits=8, strategy="token", dynamic=True, sym=True)
MIN_SCALE = 1e-5  # llm-compressor's floor on max|W_j|; keeps s finite


class SmoothQuantConfig(CalibratedConfig):
    """SmoothQuant smoothing, then per-channel symmetric int8 weights (RTN or GPTQ) and dynamic
    per-token symmetric int8 activations."""

    method: Literal["smoothquant"] = "smoothquant"
    bits: Literal[8] = 8
    group_size: Literal[-1] = Field(-1, description="W8A8 weights have one scale per output channel")
    sym: Literal[True] = True
    alpha: float = Field(0.5, ge=0, le=1, description="Migration strength: s = x^alpha / w^(1-alpha)")
    rounding: Literal["rtn", "gptq"] = Field("rtn", description="How the smoothed weights are rounded")
    damp_percent: float = Field(0.05, gt=0, lt=1, description="GPTQ damping (rounding: gptq only)")

    def spec(self, bits: int, group_size: int, sym: bool) -> "SmoothQuantSpec":
        return SmoothQuantSpec(bits=bits, group_size=group_size, sym=sym, activations=W8A8,
                               rounding=self.rounding, damp_percent=self.damp_percent)

    def name_parts(self) -> list[str]:
        return ["a8"] + (["gptq"] if self.rounding == "gptq" else [])


@dataclass(frozen=True)
class SmoothQuantSpec(QuantSpec):
    rounding: str = "rtn"
    damp_percent: float = 0.05


def _stats(q: SmoothQuantConfig) -> StatKind:
    return "hessian" if q.rounding == "gptq" else "none"


# ---- pure numerical cores ------------------------------------------------------------------
def smoothing_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s`` [in] (Eq. 4) from the per-channel activation max ``[in]`` and the
    balance weights ``[out_k, in]``. A channel the calibration never saw (max 0) keeps s = 1;
    one whose weights are all zero takes s = max|X_j| (llm-compressor's rule)."""
    x = x_absmax.float()
    w = torch.cat([W.float().abs() for W in weights]).amax(dim=0).clamp_min(MIN_SCALE)
    s = x.pow(alpha) / w.pow(1 - alpha)
    s = torch.where(w > MIN_SCALE, s, x)
    return torch.where(x > 0, s, torch.ones_like(s))


def quantize_weight(W: torch.Tensor, stats: LayerStats, spec: SmoothQuantSpec) -> QuantResult:
    """Rounds a weight the block transform already smoothed (int8 per output channel)."""
    if spec.rounding == "gptq":
        if stats.hessian is None:
            raise ValueError("smoothquant with rounding: gptq needs the layer's Hessian; calibration gave none")
        res = gptq(W, stats.hessian, GPTQSpec(spec.bits, spec.group_size, spec.sym, damp_percent=spec.damp_percent,
                                               desc_act=True, static_groups=True, mse_clip=True))
        if res.damp_percent != spec.damp_percent:
            spec = SmoothQuantSpec(**{**spec.__dict__, "damp_percent": res.damp_percent})
        return QuantResult(res.weight, spec)
    return QuantResult(round_to_nearest(W, spec), spec)


# ---- the block transform -------------------------------------------------------------------
def apply_smoothquant(view: BlockView) -> None:
    """Compute and fold SmoothQuant's scales for every mapping of the block. Every mapping's
    statistic is its balance layers' input, which only its own fold changes, so one pass over
    the unsmoothed block gives them all."""
    arch, q, block = view.arch, view.config, view.block
    where = f"{arch.blocks}.{view.index}."
    live = live_mappings(view, where, "smoothquant")
    if not live:
        return
    if view.forward is None:
        raise ValueError("smoothquant needs the block's forward in its BlockView; this engine gave none")
    names = sorted({b for m, _ in live for b in m.balance})
    x_max = view.collect(names, "act_absmax")
    probe = view.inputs.read(0, min(view.batch_size, len(view.inputs)))
    ref = view.forward(probe)
    for m, _ in live:
        xm = x_max[m.balance[0]]
        if not bool(torch.isfinite(xm).all()):
            raise ValueError(f"layer '{where}{m.balance[0]}': calibration inputs produced NaN or Inf")
        W = [weight_of(block.get_submodule(b), arch.conv1d) for b in m.balance]
        s = smoothing_scales(xm, W, q.alpha)
        if fold_checked(view, m, s, probe, ref, where, "smoothquant"):
            log.debug("smoothquant %s%s -> %s: s in [%.3g, %.3g]", where, m.smooth, ",".join(m.balance),
                      float(s.min()), float(s.max()))


register_method("smoothquant", SmoothQuantConfig, stats=_stats, block_transform=apply_smoothquant)(quantize_weight)
