"""The typed result of every quantization algorithm.

An algorithm yields integer codes, per-group scales and zero points; how they are packed on
disk is the business of the writers in `compress.formats`, never of the algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_DEQ_ELEMS = 1 << 20  # weights dequantized per slice of rows


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes plus the grid that maps them back to real weights.

    The affine convention is the GPTQ one: ``w = scale * (q - zero)`` with
    ``q`` in ``[0, 2**bits - 1]``. Symmetric grids use ``zero = 2**(bits-1)``.

    Shapes (``out`` = output features, ``in`` = input features, ``G`` = number of groups):
      codes  uint8  [out, in]   unpacked integer codes, in the layer's input order
      scales float  [out, G]
      zeros  uint8  [out, G]    integer zero points
      g_idx  int32  [in]        group of each input column (permuted when ``desc_act``)
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int  # -1 means one group per output channel
    sym: bool
    desc_act: bool = False

    def __post_init__(self) -> None:
        out_f, in_f = self.codes.shape
        if self.g_idx.shape != (in_f,):
            raise ValueError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected ({in_f},)")
        if self.scales.shape != self.zeros.shape or self.scales.shape[0] != out_f:
            raise ValueError(
                f"scales {tuple(self.scales.shape)} and zeros {tuple(self.zeros.shape)} "
                f"must both be [{out_f}, groups]"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output rows ``[start, stop)`` (a slice of a head's vocabulary), sharing storage."""
        import dataclasses

        return dataclasses.replace(self, codes=self.codes[start:stop], scales=self.scales[start:stop],
                                   zeros=self.zeros[start:stop])

    @staticmethod
    def cat_rows(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Slices of output rows with one grid and column order, as one weight."""
        import dataclasses

        return dataclasses.replace(parts[0], codes=torch.cat([p.codes for p in parts]),
                                   scales=torch.cat([p.scales for p in parts]),
                                   zeros=torch.cat([p.zeros for p in parts]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The real-valued weight ``[out, in]`` these codes stand for."""
        g = self.g_idx.long()
        out = torch.empty(self.codes.shape, dtype=dtype, device=self.codes.device)
        # A slice of rows at a time, in place: the per-column scale and zero of a full-size
        # weight would otherwise be two more weight-sized temporaries. Same values: (q - z) * s.
        step = max(1, _DEQ_ELEMS // max(1, self.codes.shape[1]))
        for r in range(0, self.codes.shape[0], step):
            rows = slice(r, r + step)
            w = out[rows]
            w.copy_(self.codes[rows])
            w.sub_(self.zeros[rows].to(dtype)[:, g]).mul_(self.scales[rows].to(dtype)[:, g])
        return out


@dataclass(frozen=True)
class BlockQuantWeight:
    """Codes on one of GGUF's block grids (`compress.quantizers.kgrid`): k-quants' two-level
    grid (fp16 ``d``/``dmin`` per block of 256, small-integer ``sc``/``m`` per sub-block) or a
    simple type's one-level grid. ``w = (d * sc) * level[q] - (dmin * m)``; a GGUF layer's
    minimum is no integer zero point, so this is not a `QuantizedWeight`.

      codes  uint8   [out, in]          index of each weight's level
      d, dmin fp16   [out, in / block]
      sc, m  int16   [out, in / sub]
    """

    grid_name: str
    codes: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor
    desc_act: bool = False  # codes are always in natural column order

    @property
    def grid(self):
        from compress.quantizers.kgrid import get_grid

        return get_grid(self.grid_name)

    @property
    def params(self):
        from compress.quantizers.kgrid import GridParams

        return GridParams(self.d, self.dmin, self.sc, self.m)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def bits(self) -> int:
        return self.grid.bits

    @property
    def group_size(self) -> int:
        return self.grid.sub

    @property
    def sym(self) -> bool:
        return self.grid.sym

    def to(self, device) -> "BlockQuantWeight":
        return BlockQuantWeight(self.grid_name, *(t.to(device) for t in (self.codes, self.d, self.dmin, self.sc, self.m)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from compress.quantizers.kgrid import dequantize

        return dequantize(self.codes, self.params, self.grid).to(dtype)
