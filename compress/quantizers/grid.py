"""The uniform quantization grid shared by every algorithm (RTN, GPTQ, AWQ).

``find_params`` chooses scale and zero per row of a slice of columns; ``quantize`` maps
values to integer codes on that grid. Conventions follow the GPTQ reference implementation
(Frantar et al., 2022, `quant.py`) so our codes load in the GPTQ ecosystem unchanged.
"""
from __future__ import annotations

import torch


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def find_params(
    x: torch.Tensor, bits: int, sym: bool, shrink: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and (integer-valued, float-typed) zero for ``x`` [rows, cols].

    ``shrink`` < 1 narrows the range (clipping search uses it); 1.0 is plain min/max.
    """
    maxq = max_code(bits)
    xmin = torch.clamp(x.amin(dim=1), max=0) * shrink
    xmax = torch.clamp(x.amax(dim=1), min=0) * shrink
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    # An all-zero row would give scale 0: widen it so codes stay finite.
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(dead, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
        # Asymmetric zero points start at 1: GPTQ v1 files store zero-1, so a zero of 0 wraps
        # (GPTQModel refuses such files, other loaders misread them). A row whose minimum rounds
        # to code 0 (all weights >= 0, or a minimum within half a step of 0; 4 of 1.66M groups
        # at 3-bit g64 on SmolLM2-135M) gets a scale stretched so that 0.0 sits on code 1.
        low = zero < 1
        if bool(low.any()):
            scale = torch.where(low, xmax / (maxq - 1), scale)
            zero = torch.where(low, torch.ones_like(zero), zero)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (float-typed) of ``x`` [rows, cols] with per-row ``scale``/``zero`` [rows]."""
    q = torch.round(x / scale.unsqueeze(1)) + zero.unsqueeze(1)
    return torch.clamp(q, 0, max_code(bits))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale.unsqueeze(1) * (q - zero.unsqueeze(1))
