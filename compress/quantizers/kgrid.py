"""GGUF's block grids, two-level (k-quants) and one-level, as a grid every algorithm rounds on.

Every GGUF block type we write is one formula over a block of ``block`` consecutive weights of
a row, split into sub-blocks of ``sub`` weights (ggml-common.h, ggml-quants.c):

    w = (d * sc) * level[q] - (dmin * m)

``d``/``dmin`` are fp16 per block; ``sc``/``m`` small integers per sub-block (the quantized
sub-block scale and min: 6-bit for Q4_K/Q5_K, 4-bit for Q2_K, int8 for Q6_K, 6-bit signed for
Q3_K); ``level`` maps a code to its value (``q - offset`` for the linear types, a fixed table
for IQ4_NL). One-level types (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1, IQ4_NL) have ``sub == block`` and
``sc = 1``; Q4_1/Q5_1's fp16 min is ``-(dmin * 1)``. Computed in float32 in this order, it is
bit for bit gguf-py's dequantization (tests/quantizers/test_kgrid.py).

Choosing the grid of a row (`fit`), the first level is a per-sub-block range search (the range
shrunk by factors 1.0..0.8 in steps of 0.04, each candidate scored by its squared error, weighted by ``weight``
when given, e.g. GPTQ's diag(H)); the second quantizes the sub-block scales and mins against the
block's ``d = max scale / sc_max`` (as ``quantize_row_q4_K_ref`` does) and the codes are then
chosen with those quantized scales (`codes`). Bit layouts live in `compress.formats.gguf_kquants`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SHRINKS = tuple(1.0 - 0.04 * i for i in range(6))  # 1.00 .. 0.80
_CHUNK = 1 << 20  # weights per slice of the range search
IQ4NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class BlockGrid:
    name: str  # GGMLQuantizationType name
    bits: int
    block: int  # weights per block (256: k-quants, 32: simple types)
    sub: int  # weights per sub-block sharing a scale (and min)
    asym: bool  # a min is subtracted
    sc_range: Optional[tuple[int, int]]  # integer range of quantized sub-scales; None: one level
    m_max: int  # largest quantized sub-min (k-quant asym types)
    levels: tuple[int, ...]  # value of each code

    @property
    def two_level(self) -> bool:
        return self.sc_range is not None

    @property
    def sym(self) -> bool:
        return not self.asym

    @property
    def linear(self) -> bool:
        """Levels are consecutive integers (every type but IQ4_NL): rounding is arithmetic."""
        return self.levels == tuple(range(self.levels[0], self.levels[0] + len(self.levels)))

    def values(self, q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The level of each code (exact integers in float)."""
        if self.linear:
            return q.to(dtype) + self.levels[0]
        return self.level_tensor(q.device).to(dtype)[q.long()]

    def level_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.levels, dtype=torch.float32, device=device)


def _lin(lo: int, n: int) -> tuple[int, ...]:
    return tuple(range(lo, lo + n))


GRIDS: dict[str, BlockGrid] = {g.name: g for g in (
    BlockGrid("Q2_K", 2, 256, 16, True, (0, 15), 15, _lin(0, 4)),
    BlockGrid("Q3_K", 3, 256, 16, False, (-32, 31), 0, _lin(-4, 8)),
    BlockGrid("Q4_K", 4, 256, 32, True, (0, 63), 63, _lin(0, 16)),
    BlockGrid("Q5_K", 5, 256, 32, True, (0, 63), 63, _lin(0, 32)),
    BlockGrid("Q6_K", 6, 256, 16, False, (-128, 127), 0, _lin(-32, 64)),
    BlockGrid("Q8_0", 8, 32, 32, False, None, 0, _lin(-128, 256)),
    BlockGrid("Q4_0", 4, 32, 32, False, None, 0, _lin(-8, 16)),
    BlockGrid("Q5_0", 5, 32, 32, False, None, 0, _lin(-16, 32)),
    BlockGrid("Q4_1", 4, 32, 32, True, None, 1, _lin(0, 16)),
    BlockGrid("Q5_1", 5, 32, 32, True, None, 1, _lin(0, 32)),
    BlockGrid("IQ4_NL", 4, 32, 32, False, None, 0, IQ4NL_LEVELS),
)}


def get_grid(name: str) -> BlockGrid:
    try:
        return GRIDS[name]
    except KeyError:
        raise KeyError(f"unknown GGUF block grid '{name}'; valid: {', '.join(GRIDS)}") from None


@dataclass(frozen=True)
class GridParams:
    """One layer's grid: ``d``/``dmin`` fp16 [out, in/block], ``sc``/``m`` int16 [out, in/sub]."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor

    def effective(self, grid: BlockGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sub-block scale ``d * sc`` and min ``dmin * m``, float32 [out, in/sub], as ggml computes them."""
        per = grid.block // grid.sub
        d = self.d.float().repeat_interleave(per, dim=1)
        dmin = self.dmin.float().repeat_interleave(per, dim=1)
        return d * self.sc.float(), dmin * self.m.float()


def nearest(y: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Index of the level nearest ``y`` (ties to the lower level), as int64."""
    if grid.linear:  # round half to even, then clamp to the codes
        return (torch.round(y) - grid.levels[0]).clamp_(0, len(grid.levels) - 1).long()
    lv = grid.level_tensor(y.device).to(y.dtype)
    return torch.bucketize(y.contiguous(), (lv[1:] + lv[:-1]) / 2)


def codes_for(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Codes of ``x`` given a scale and min of the same shape (or broadcasting): the nearest level
    of ``(x + mn) / scale``; a zero scale gives the level nearest 0."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = torch.where(scale == 0, torch.zeros_like(x), (x + mn) / safe)
    return nearest(y, grid)


def _first_level(x: torch.Tensor, grid: BlockGrid, weight: Optional[torch.Tensor],
                 shrinks: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unquantized scale and min (>= 0 subtracted) per row of ``x`` [rows, sub]: best of the shrunk ranges."""
    lv = grid.level_tensor(x.device).to(x.dtype)
    best = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    scale = torch.zeros_like(best)
    mn = torch.zeros_like(best)
    if grid.asym:
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        if grid.two_level:  # k-quants store the min as a non-negative multiple of dmin
            lo = lo.clamp(max=0)
    else:
        ext = x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)  # signed extreme
    for p in shrinks:
        if grid.asym:
            s = (hi - lo) * p / (lv[-1] - lv[0])
            n = -lo * p
        else:  # the extreme maps to the most negative level, the longer side (ggml's d = max / -8)
            s = ext * p / lv[0]
            n = torch.zeros_like(s)
        q = codes_for(x, s.unsqueeze(1), n.unsqueeze(1), grid)
        err = (s.unsqueeze(1) * grid.values(q, x.dtype) - n.unsqueeze(1) - x).pow_(2)
        if weight is not None:
            err = err * weight
        err = err.sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        mn = torch.where(better, n, mn)
    return scale, mn


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-65504.0, 65504.0).to(torch.float16)


def _second_level(scale: torch.Tensor, mn: torch.Tensor, grid: BlockGrid) -> GridParams:
    """Quantize sub-block scales/mins [out, nsub] against fp16 per-block ``d``/``dmin``."""
    out_f, nsub = scale.shape
    if not grid.two_level:
        d = _fp16(scale)
        ones = torch.ones(out_f, nsub, dtype=torch.int16, device=scale.device)
        dmin = _fp16(mn) if grid.asym else torch.zeros_like(d)
        return GridParams(d, dmin, ones, ones if grid.asym else torch.zeros_like(ones))
    per = grid.block // grid.sub
    s = scale.reshape(out_f, -1, per).float()
    lo, hi = grid.sc_range
    if grid.asym:
        d = _fp16(s.amax(dim=2) / hi)
    else:  # the signed extreme maps to the most negative integer (Q6_K: -128, Q3_K: -32)
        ext = s.gather(2, s.abs().argmax(dim=2, keepdim=True)).squeeze(2)
        d = _fp16(ext / lo)

    def ints(v: torch.Tensor, dd: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        df = dd.float().unsqueeze(2)
        safe = torch.where(df == 0, torch.ones_like(df), df)
        r = torch.where(df == 0, torch.zeros_like(v), torch.round(v / safe))
        return r.clamp(bottom, top).to(torch.int16).reshape(out_f, nsub)

    sc = ints(s, d, hi, lo)
    if grid.asym:
        mm = mn.reshape(out_f, -1, per).float()
        dmin = _fp16(mm.amax(dim=2) / grid.m_max)
        m = ints(mm, dmin, grid.m_max, 0)
    else:
        dmin = torch.zeros_like(d)
        m = torch.zeros_like(sc)
    return GridParams(d, dmin, sc, m)


def fit(W: torch.Tensor, grid: BlockGrid, weight: Optional[torch.Tensor] = None,
        shrinks: tuple[float, ...] = SHRINKS) -> GridParams:
    """The grid of ``W`` [out, in] (``in`` a multiple of ``grid.block``); ``weight`` [in] or
    [out, in] scores each weight's squared error in the range search (None: plain error)."""
    out_f, in_f = W.shape
    if in_f % grid.block:
        raise ValueError(f"input size {in_f} is not a multiple of {grid.name}'s block of {grid.block}")
    W = W.float()
    nsub = in_f // grid.sub
    scale = torch.empty(out_f, nsub, device=W.device)
    mn = torch.empty_like(scale)
    step = max(1, _CHUNK // max(1, in_f))
    for r in range(0, out_f, step):
        rows = slice(r, r + step)
        x = W[rows].reshape(-1, grid.sub)
        wt = None
        if weight is not None:
            wt = weight.float().expand(W[rows].shape).reshape(-1, grid.sub)
        s, n = _first_level(x, grid, wt, shrinks)
        scale[rows] = s.reshape(-1, nsub)
        mn[rows] = n.reshape(-1, nsub)
    return _second_level(scale, mn, grid)


def codes(W: torch.Tensor, params: GridParams, grid: BlockGrid) -> torch.Tensor:
    """Round-to-nearest codes of ``W`` [out, in] on a fitted grid, uint8."""
    s, mn = params.effective(grid)
    out_f, in_f = W.shape
    x = W.float().reshape(out_f, -1, grid.sub)
    return codes_for(x, s.unsqueeze(2), mn.unsqueeze(2), grid).reshape(out_f, in_f).to(torch.uint8)


def dequantize(q: torch.Tensor, params: GridParams, grid: BlockGrid) -> torch.Tensor:
    """``(d * sc) * level[q] - (dmin * m)`` in float32, ggml's order of operations."""
    s, mn = params.effective(grid)
    out_f, in_f = q.shape
    lv = grid.values(q).reshape(out_f, -1, grid.sub)
    return (s.unsqueeze(2) * lv - mn.unsqueeze(2)).reshape(out_f, in_f)
