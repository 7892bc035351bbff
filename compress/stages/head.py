"""`quantize.lm_head` rounded by GPTQ: the Hessian of what the head receives, and the head's
rows rounded against it a slice at a time.

The head's input is the final norm's output (what the model's own forward hands the lm_head),
over the calibration windows as they leave the last block of the quantize walk, so the
Hessian is ``hidden x hidden`` and the walk holds nothing more than it already does. GPTQ's
rows are independent given ``H`` (the column order, damping and inverse Cholesky factor come
from ``H`` alone; grids and error updates are per row), so the ``vocab x hidden`` head is
rounded slice by slice as the exporter reads it from the checkpoint, never whole, and ``H`` is
factorised once for all the slices (``O(hidden^3)``: 18 s at hidden 8192 on one core, where a
128k-token vocabulary has 32 slices of 4096 rows).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from compress.activations import WindowStream
from compress.engine import StreamedModel
from compress.formats.qweight import QuantizedWeight
from compress.quantizers.base import MethodConfig, NumericalError, QuantSpec
from compress.quantizers.gptq import GPTQConfig, GPTQSpec, HessianFactor, factor_hessian, gptq_factored
from compress.quantizers.hessian import HessianAccumulator, output_error
from compress.quantizers.rtn import round_to_nearest

log = logging.getLogger(__name__)

# GPTQ options a plan may carry (gptq: all; awq, smoothquant: damp_percent); the rest are GPTQ's defaults.
_OPTIONS = ("damp_percent", "block_size", "desc_act", "mse_clip")


def head_gptq_spec(q: MethodConfig, grid: QuantSpec) -> GPTQSpec:
    """GPTQ's settings for the head on `grid`: the plan's GPTQ options where it has them, else
    `GPTQConfig`'s defaults. Groups are always static, so g_idx stays in column order: every
    format that holds a quantized head (MatMulNBits, GGUF, compressed-tensors) reads it so."""
    defaults = GPTQConfig.model_fields
    opts = {k: getattr(q, k) if k in type(q).model_fields else defaults[k].default for k in _OPTIONS}
    return GPTQSpec(grid.bits, grid.group_size, grid.sym, static_groups=True, **opts)


def head_hessian(sm: StreamedModel, final_hidden: WindowStream, input_ids: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``H = 2/n sum x x^T`` [hidden, hidden] of the lm_head's inputs ``x`` over every token of
    the windows whose last-block outputs `final_hidden` holds (`StreamedModel.head_input_windows`:
    the model's own final norm, one window at a time)."""
    acc: Optional[HessianAccumulator] = None
    for _, x in sm.head_input_windows(final_hidden, input_ids):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("lm_head: calibration inputs produced NaN or Inf (the final norm's output)")
        if acc is None:
            acc = HessianAccumulator(x.shape[-1], dtype, x.device)
        acc.add(x)
    if acc is None:
        raise ValueError("lm_head: no calibration windows to collect the head's Hessian from")
    return acc.hessian


@dataclass(frozen=True)
class HeadResult:
    """The rounded head and what the manifest and the layer report say about it."""

    weight: QuantizedWeight
    method: str  # "rtn", "gptq", or "rtn-fallback" (GPTQ failed numerically)
    damp_percent: Optional[float]  # GPTQ's damping as used (after retries); None for RTN
    weight_rel_error: float
    output_rel_error: Optional[float]  # tr(D H D^T) / tr(W H W^T), where a Hessian exists


class SliceRounder:
    """Rounds the head's row slices on `grid`: to nearest, or by GPTQ against `hessian` with
    `spec` (both given), factorised once on the first slice. A GPTQ failure (Cholesky, after the
    damping retries) is decided by ``H`` alone, so it happens there, and from then on every
    slice rounds to nearest. `method` and `damp` say what was used."""

    def __init__(self, grid: QuantSpec, name: str, hessian: Optional[torch.Tensor] = None,
                 spec: Optional[GPTQSpec] = None) -> None:
        self.grid, self.name, self.hessian, self.spec = grid, name, hessian, spec
        use_gptq = hessian is not None and spec is not None
        self.method, self.damp = ("gptq", spec.damp_percent) if use_gptq else ("rtn", None)
        self._factor: Optional[HessianFactor] = None

    def __call__(self, w: torch.Tensor) -> QuantizedWeight:
        if self.method == "gptq":
            try:
                if self._factor is None:  # in the dtype and on the device the slices are rounded in
                    self._factor = factor_hessian(self.hessian, self.spec, w.dtype, w.device)
                res = gptq_factored(w, self._factor, self.spec)
                self.damp = res.damp_percent
                return res.weight
            except NumericalError as e:
                log.warning("layer '%s': %s; rounding the head to nearest instead (raise quantize.damp_percent "
                            "or set quantize.lm_head.rounding: rtn)", self.name, e)
                self.method, self.damp = "rtn-fallback", None
        return round_to_nearest(w, self.grid)


def round_head(slices: Iterable[torch.Tensor], grid: QuantSpec, name: str,
               hessian: Optional[torch.Tensor] = None, spec: Optional[GPTQSpec] = None) -> HeadResult:
    """Round the head given as consecutive slices of rows (`SliceRounder`): to nearest, or by
    GPTQ against `hessian` with `spec`; a GPTQ failure sends the whole head to nearest."""
    rounder = SliceRounder(grid, name, hessian, spec)
    parts: list[QuantizedWeight] = []
    err = energy = out_err = out_energy = 0.0
    for w in slices:
        w = w.float()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer '{name}': weights contain NaN or Inf")
        qw = rounder(w)
        parts.append(qw)
        wq = qw.dequantize(torch.float32)
        if not bool(torch.isfinite(wq).all()):
            raise ValueError(f"layer '{name}': quantized weights contain NaN or Inf")
        err += float((w - wq).double().pow(2).sum())
        energy += float(w.double().pow(2).sum())
        if hessian is not None:
            out_err += output_error(w, wq, hessian)
            out_energy += output_error(w, torch.zeros_like(w), hessian)
    o_rel = None if hessian is None else out_err / max(out_energy, 1e-30)
    return HeadResult(QuantizedWeight.cat_rows(parts), rounder.method, rounder.damp, err / max(energy, 1e-30), o_rel)
