"""Our `QuantizedWeight` in the layout of ONNX Runtime's ``com.microsoft::MatMulNBits``.

The contrib op (onnxruntime docs/ContribOperators.md, MatMulNBits) computes ``Y = A @ W.T``
for ``W`` [N, K] stored as:

  B            uint8 [N, k_blocks, block_size * bits / 8]  codes along K, packed low bits first
  scales       float [N, k_blocks]
  zero_points  uint8 [N, ceil(k_blocks * bits / 8)]  packed the same way per row; absent:
               2**(bits-1), which is our symmetric zero point
  w = (code - zero_point) * scale

with ``k_blocks = ceil(K / block_size)``, ``block_size`` a power of two >= 16. That is our
affine grid exactly, so the codes are copied, never quantized again:

- a group of ``group_size`` consecutive columns is one block (``block_size = group_size``);
- per-channel grids (``group_size = -1``) repeat the row's scale and zero over blocks
  (same values, a few more bytes) of the size in `PER_CHANNEL_BLOCKS` that takes the fewest
  bytes: K = 576 takes blocks of 64, not 128, whose padding to 640 columns would add 11%;
- an act-order ``g_idx`` (GPTQ ``desc_act`` with dynamic groups) is undone by a column
  permutation: columns are sorted by group, the codes follow, and the graph gathers the
  input's columns in that order (``perm``) before the matmul. The op's own ``g_idx`` input
  would make ORT fall back from its prepacked kernels.

Linears that read the same input (q/k/v, gate/up) can be one op: `concat` stacks their rows
(N), which is exact when they share K, bits, block size and column order. GPTQ's act-order
columns of q, k and v come from one Hessian and agree; when they do not (mixed schemes), the
layers stay separate ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from compress.formats.qweight import QuantizedWeight

BITS = (4, 8)
PER_CHANNEL_BLOCKS = (128, 64, 32, 16)  # largest first: it wins ties


def block_size_for(group_size: int, in_features: int, bits: int = 8) -> Optional[int]:
    """The op's block size for our group size (None: none fits); per channel, the one whose
    codes, scales and zero points take the fewest bytes."""
    if group_size == -1:
        return min(PER_CHANNEL_BLOCKS, key=lambda b: _row_bytes(in_features, bits, b, zero_points=True))
    if group_size >= 16 and group_size & (group_size - 1) == 0:
        return group_size
    return None


def _row_bytes(in_features: int, bits: int, block_size: int, zero_points: bool) -> int:
    """Bytes of one row of `to_matmulnbits`'s B, scales (float32) and zero points."""
    k_blocks = -(-in_features // block_size)
    return k_blocks * block_size * bits // 8 + 4 * k_blocks + (-(-k_blocks * bits // 8) if zero_points else 0)


@dataclass(frozen=True)
class NBitsTensors:
    B: torch.Tensor  # uint8 [N, k_blocks, blob]
    scales: torch.Tensor  # float32 [N, k_blocks]
    zero_points: Optional[torch.Tensor]  # uint8 [N, zp_bytes] or None (the default 2**(bits-1))
    perm: Optional[torch.Tensor]  # int64 [K]: input columns in the order B holds them, or None
    K: int
    N: int
    bits: int
    block_size: int

    @property
    def k_blocks(self) -> int:
        return self.B.shape[1]


def _pack_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values [R, C] (< 2**bits) -> bytes [R, ceil(C*bits/8)], low bits first."""
    if bits == 8:
        return x.to(torch.uint8).contiguous()
    per = 8 // bits
    r, c = x.shape
    pad = -c % per
    if pad:
        x = torch.cat([x, torch.zeros(r, pad, dtype=x.dtype)], 1)
    x = x.to(torch.int32).reshape(r, -1, per)
    out = torch.zeros(x.shape[:2], dtype=torch.int32)
    for j in range(per):
        out |= x[..., j] << (bits * j)
    return out.to(torch.uint8)


def column_order(qw: QuantizedWeight) -> Optional[torch.Tensor]:
    """The permutation that makes every group contiguous (None: it already is)."""
    K = qw.shape[1]
    gs = K if qw.group_size == -1 else qw.group_size
    plain = torch.arange(K, dtype=torch.int64) // gs
    g = qw.g_idx.to(torch.int64)
    if torch.equal(g, plain):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], plain):  # groups of unequal sizes: no block layout holds them
        raise ValueError("g_idx groups are not all group_size columns; MatMulNBits blocks cannot hold them")
    return perm


def to_matmulnbits(qw: QuantizedWeight) -> NBitsTensors:
    """The op's tensors for `qw` (codes copied; see the module docstring)."""
    if qw.bits not in BITS:
        raise ValueError(f"MatMulNBits export holds bits {BITS}, not {qw.bits}")
    N, K = qw.shape
    bs = block_size_for(qw.group_size, K, qw.bits)
    if bs is None:
        raise ValueError(f"group_size {qw.group_size} is not a power of two >= 16 (MatMulNBits block_size)")
    perm = column_order(qw)
    codes = qw.codes if perm is None else qw.codes[:, perm]
    k_blocks = -(-K // bs)
    if qw.group_size == -1:
        scales = qw.scales[:, :1].expand(N, k_blocks)
        zeros = qw.zeros[:, :1].expand(N, k_blocks)
    else:
        scales, zeros = qw.scales, qw.zeros  # group j = columns j*bs .. (j+1)*bs in B's order
    pad = k_blocks * bs - K
    if pad:
        codes = torch.cat([codes, torch.zeros(N, pad, dtype=codes.dtype)], 1)
    B = _pack_rows(codes.to(torch.uint8), qw.bits).reshape(N, k_blocks, bs * qw.bits // 8)
    default = 1 << (qw.bits - 1)
    zp = None if bool((zeros == default).all()) else _pack_rows(zeros.to(torch.uint8), qw.bits)
    return NBitsTensors(B.contiguous(), scales.to(torch.float32).contiguous(), zp, perm, K, N, qw.bits, bs)


def _unpack_rows(b: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `_pack_rows`: bytes [R, C'] -> the first `n` values [R, n] of each row."""
    if bits == 8:
        return b[:, :n]
    per, mask = 8 // bits, (1 << bits) - 1
    vals = torch.stack([(b >> (bits * j)) & mask for j in range(per)], -1)
    return vals.reshape(b.shape[0], -1)[:, :n]


def dequantize_rows(B: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
                    K: int, bits: int) -> torch.Tensor:
    """The float weights [R, K] of rows of the op's tensors (`B` [R, k_blocks, blob], `scales`
    [R, k_blocks], `zero_points` [R, zp_bytes] or None), columns in B's order: what ONNX Runtime
    multiplies by, read back for evaluation (a quantized head)."""
    R, kb, blob = B.shape
    bs = blob * 8 // bits
    codes = _unpack_rows(B.reshape(R, -1), bits, kb * bs).to(torch.float32).reshape(R, kb, bs)
    if zero_points is None:
        zp = torch.full((R, kb), float(1 << (bits - 1)))
    else:
        zp = _unpack_rows(zero_points, bits, kb).to(torch.float32)
    return ((codes - zp[..., None]) * scales.to(torch.float32)[..., None]).reshape(R, -1)[:, :K]


def concat(parts: list[NBitsTensors]) -> Optional[NBitsTensors]:
    """One op's tensors for linears of the same input stacked along N (None: their layouts
    differ). A part without zero points gets the op's default ones written out, so a
    symmetric and an asymmetric layer still stack."""
    first = parts[0]
    key = (first.K, first.bits, first.block_size, first.k_blocks)
    if any((p.K, p.bits, p.block_size, p.k_blocks) != key for p in parts):
        return None
    if any((p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm))
           for p in parts):
        return None
    zp = None
    if any(p.zero_points is not None for p in parts):
        default = torch.full((1, first.k_blocks), 1 << (first.bits - 1), dtype=torch.uint8)
        zp = torch.cat([p.zero_points if p.zero_points is not None else _pack_rows(default, first.bits).expand(p.N, -1)
                        for p in parts])
    return NBitsTensors(torch.cat([p.B for p in parts]), torch.cat([p.scales for p in parts]), zp, first.perm,
                        first.K, sum(p.N for p in parts), first.bits, first.block_size)


def nbytes(out_features: int, in_features: int, bits: int, group_size: int, sym: bool) -> int:
    """Bytes of `to_matmulnbits`'s tensors for a layer of this shape (asymmetric grids keep
    zero points; act-order adds an int64 permutation, not counted here: it depends on the data)."""
    bs = block_size_for(group_size, in_features, bits) or group_size
    return out_features * _row_bytes(in_features, bits, bs, zero_points=not sym)
