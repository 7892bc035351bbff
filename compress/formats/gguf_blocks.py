"""GGUF's simple block types as our grid: exact encoders from `QuantizedWeight` and torch decoders.

ggml block layouts (ggml-common.h, ``block_q8_0``/``block_q4_0``/``block_q4_1``), 32 weights a block
along the input dim, blocks of a row consecutive, rows consecutive:

  Q8_0  d fp16 | 32 x int8 qs                   w = d * qs
  Q4_0  d fp16 | 16 bytes: qs[j] | qs[j+16] << 4  w = d * (qs - 8)
  Q4_1  d fp16 | m fp16 | 16 bytes as Q4_0       w = d * qs + m

Our grid is ``w = scale * (code - zero)`` (`QuantizedWeight`). Symmetric 8-bit codes have
zero 128, so ``qs = code - 128`` (int8); symmetric 4-bit codes have zero 8, which is Q4_0's
offset, so ``qs = code``; asymmetric 4-bit codes are stored as they are with ``d = scale`` and
``m = -d * zero``. The codes are exact; ``d`` (and ``m``) round to fp16 as every GGUF scale
does, and Q4_1's ``m`` is the fp16 of ``-fp16(scale) * zero``.

The decoders compute in float32 in the order gguf-py's ``dequantize_blocks`` does, so they give
the same bits as transformers' GGUF loader (which calls gguf-py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats.qweight import QuantizedWeight

BLOCK = 32
_FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class BlockType:
    name: str  # GGMLQuantizationType name
    bits: int
    sym: bool
    bytes: int  # per block of 32 weights

    def row_bytes(self, in_features: int) -> int:
        return in_features // BLOCK * self.bytes


TYPES = {
    "Q8_0": BlockType("Q8_0", 8, True, 2 + 32),
    "Q4_0": BlockType("Q4_0", 4, True, 2 + 16),
    "Q4_1": BlockType("Q4_1", 4, False, 2 + 2 + 16),
}


def type_for(bits: int, group_size: int, sym: bool) -> BlockType | None:
    """The simple GGUF type whose grid is exactly (bits, group_size, sym), if any."""
    if group_size != BLOCK:
        return None
    return next((t for t in TYPES.values() if (t.bits, t.sym) == (bits, sym)), None)


def _fp16(x: torch.Tensor, what: str) -> torch.Tensor:
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > _FP16_MAX:
        raise ValueError(f"{what}: non-finite or beyond the fp16 range")
    h = x.to(torch.float16)
    if bool(((x != 0) & (h == 0)).any()):
        raise ValueError(f"{what}: a scale underflows to 0 in fp16")
    return h


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[rows, blocks, 32] codes 0..15 -> [rows, blocks, 16] bytes, element j low, j+16 high."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _unnibble(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def encode(qw: QuantizedWeight, t: BlockType, name: str = "weight") -> torch.Tensor:
    """The layer's GGUF bytes, ``uint8 [out, in/32 * t.bytes]``, rows in the layer's order."""
    out_f, in_f = qw.shape
    if (qw.bits, qw.group_size, qw.sym) != (t.bits, BLOCK, t.sym):
        raise ValueError(f"{name}: grid bits={qw.bits} group_size={qw.group_size} sym={qw.sym} is not {t.name}'s")
    if in_f % BLOCK:
        raise ValueError(f"{name}: input size {in_f} is not a multiple of {BLOCK}")
    if not torch.equal(qw.g_idx.to(torch.int64), torch.arange(in_f) // BLOCK):
        # GGUF blocks are consecutive columns: a permuted g_idx (act-order, dynamic groups) has no place
        raise ValueError(f"{name}: g_idx is permuted (act-order with dynamic groups); GGUF needs "
                         "quantize.static_groups: true")
    nb = in_f // BLOCK
    codes = qw.codes.reshape(out_f, nb, BLOCK)
    d = _fp16(qw.scales, f"{name} scales")  # [out, nb]
    zeros = qw.zeros.to(torch.int16)
    parts = [d.unsqueeze(-1).view(torch.uint8)]
    if t.name == "Q8_0":
        if bool((zeros != 128).any()):
            raise ValueError(f"{name}: Q8_0 needs the symmetric zero 128")
        parts.append((codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
    elif t.name == "Q4_0":
        if bool((zeros != 8).any()):
            raise ValueError(f"{name}: Q4_0 needs the symmetric zero 8")
        parts.append(_nibbles(codes))
    else:  # Q4_1
        m = _fp16(-d.to(torch.float32) * zeros.to(torch.float32), f"{name} mins")
        parts += [m.unsqueeze(-1).view(torch.uint8), _nibbles(codes)]
    return torch.cat(parts, dim=-1).reshape(out_f, nb * t.bytes).contiguous()


def decode(raw: torch.Tensor, t: BlockType, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``[out, in]`` that GGUF bytes ``uint8 [out, in/32 * t.bytes]`` stand for."""
    out_f = raw.shape[0]
    b = raw.reshape(out_f, -1, t.bytes)
    d = b[..., 0:2].contiguous().view(torch.float16).to(torch.float32)  # [out, nb, 1]
    if t.name == "Q8_0":
        w = b[..., 2:].contiguous().view(torch.int8).to(torch.float32) * d
    elif t.name == "Q4_0":
        w = d * (_unnibble(b[..., 2:]).to(torch.float32) - 8)
    else:
        m = b[..., 2:4].contiguous().view(torch.float16).to(torch.float32)
        w = d * _unnibble(b[..., 4:]).to(torch.float32) + m
    return w.reshape(out_f, -1).to(dtype)
