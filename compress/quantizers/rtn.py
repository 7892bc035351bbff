"""Round to nearest: each group's min/max sets the grid, each weight takes the nearest code."""
from __future__ import annotations

from typing import Literal, Union

import torch

from compress.formats.qweight import BlockQuantWeight, QuantizedWeight
from compress.quantizers import kgrid
from compress.quantizers.base import LayerStats, MethodConfig, QuantResult, QuantSpec, register_method
from compress.quantizers.grid import find_params, quantize


class RTNConfig(MethodConfig):
    """Round to nearest per group; needs no calibration data."""

    method: Literal["rtn"] = "rtn"


def round_to_nearest(W: torch.Tensor, spec: QuantSpec) -> Union[QuantizedWeight, BlockQuantWeight]:
    if spec.gguf_grid is not None:  # plain (unweighted) range search, codes on the quantized scales
        g = kgrid.get_grid(spec.gguf_grid)
        p = kgrid.fit(W, g)
        return BlockQuantWeight(g.name, kgrid.codes(W, p, g), p.d, p.dmin, p.sc, p.m)
    out_f, in_f = W.shape
    gs = in_f if spec.group_size == -1 else spec.group_size
    W = W.float()
    groups = W.reshape(out_f, in_f // gs, gs)  # [out, G, gs]
    flat = groups.permute(1, 0, 2).reshape(-1, gs)  # every (group, row) pair is one row
    scale, zero = find_params(flat, spec.bits, spec.sym)
    codes = quantize(flat, scale, zero, spec.bits)
    n_g = in_f // gs
    codes = codes.reshape(n_g, out_f, gs).permute(1, 0, 2).reshape(out_f, in_f)
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scales=scale.reshape(n_g, out_f).t().contiguous(),
        zeros=zero.reshape(n_g, out_f).t().contiguous().to(torch.uint8),
        g_idx=(torch.arange(in_f, dtype=torch.int32) // gs),
        bits=spec.bits,
        group_size=spec.group_size,
        sym=spec.sym,
    )


@register_method("rtn", RTNConfig)
def quantize_weight(W: torch.Tensor, stats: LayerStats, spec: QuantSpec) -> QuantResult:
    return QuantResult(round_to_nearest(W, spec), spec.grid)
