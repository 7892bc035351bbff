"""Bit layouts of GGUF's block grids (`compress.quantizers.kgrid`): `BlockQuantWeight` <-> bytes.

ggml-common.h's structs, one block after another along a row, rows consecutive. ``e[i]`` is the
block's i-th code; ``x[a:b]`` are bytes:

  Q4_K  d, dmin fp16 | scales[12] | qs[128]: qs[c*32+l] = e[c*64+l] | e[c*64+32+l] << 4
  Q5_K  d, dmin | scales[12] | qh[32]: bit i of qh[l] = e[i*32+l] >> 4 | qs[128] as Q4_K (low 4 bits)
  Q2_K  scales[16] = sc | m << 4 | qs[64]: bits 2k of qs[h*32+l] = e[h*128+k*32+l] | d, dmin
  Q3_K  hmask[32]: bit i of hmask[l] = e[i*32+l] >> 2 | qs[64] as Q2_K (low 2 bits) | scales[12] | d
  Q6_K  ql[128]: ql[h*64+l] = e[h*128+l] & 15 | (e[h*128+64+l] & 15) << 4 |
        qh[64]: bits 2k of qh[h*32+l] = e[h*128+k*32+l] >> 4 | scales[16] int8 | d
  Q8_0  d | 32 int8 (code - 128);  Q4_0, IQ4_NL  d | qs[16] = e[j] | e[j+16] << 4
  Q4_1  d | m | qs[16];  Q5_0  d | qh uint32 (bit i = e[i] >> 4) | qs[16];  Q5_1  d | m | qh | qs

Q4_K/Q5_K's 12 scale bytes hold eight 6-bit scales and mins (``get_scale_min_k4``): bytes 0-3
``sc[0:4] | (sc[4:8] >> 4) << 6``, 4-7 the same for mins, 8-11 ``sc[4:8] & 15 | (m[4:8] & 15) << 4``.
Q3_K's hold sixteen 6-bit ``sc + 32``: low nibbles in bytes 0-7 (index s < 8 low, s >= 8 high
nibble of byte s-8), high 2 bits at bits 2k of byte 8+j for index 4k+j. Q4_1/Q5_1 store the
min ``m = -dmin`` (kgrid's form subtracts it).
"""
from __future__ import annotations

import torch

from compress.formats.qweight import BlockQuantWeight
from compress.quantizers.kgrid import BlockGrid, get_grid

BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q8_0": 34,
               "Q4_0": 18, "Q5_0": 22, "Q4_1": 20, "Q5_1": 24, "IQ4_NL": 18}


def row_bytes(grid: BlockGrid, in_features: int) -> int:
    return in_features // grid.block * BLOCK_BYTES[grid.name]


def _h(x: torch.Tensor) -> torch.Tensor:
    """fp16 [N] -> bytes [N, 2]."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _unh(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1)


def _bits(v: torch.Tensor, width: int) -> torch.Tensor:
    """[N, k, L] fields of `width` bits -> [N, L] bytes, field k at bit k*width."""
    out = torch.zeros(v.shape[0], v.shape[2], dtype=torch.uint8, device=v.device)
    for k in range(v.shape[1]):
        out |= (v[:, k].to(torch.uint8) & ((1 << width) - 1)) << (k * width)
    return out


def _unbits(b: torch.Tensor, width: int, k: int) -> torch.Tensor:
    """[N, L] bytes -> [N, k, L] fields."""
    return torch.stack([(b >> (i * width)) & ((1 << width) - 1) for i in range(k)], dim=1)


def _scales12_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    return torch.cat([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
                      (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], dim=1)


def _unscales12_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, mm, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 0x30)], dim=1)
    m = torch.cat([mm & 63, (md >> 4) | ((mm >> 2) & 0x30)], dim=1)
    return sc.to(torch.int16), m.to(torch.int16)


def _scales12_q3(sc: torch.Tensor) -> torch.Tensor:
    u = (sc + 32).to(torch.uint8)  # [N, 16]
    low = (u[:, :8] & 15) | ((u[:, 8:] & 15) << 4)
    high = _bits((u >> 4).reshape(-1, 4, 4), 2)  # index 4k+j -> bits 2k of byte j
    return torch.cat([low, high], dim=1)


def _unscales12_q3(b: torch.Tensor) -> torch.Tensor:
    low = torch.cat([b[:, :8] & 15, b[:, :8] >> 4], dim=1)
    high = _unbits(b[:, 8:12], 2, 4).reshape(-1, 16)
    return ((low | (high << 4)).to(torch.int16) - 32)


def _nib32(e: torch.Tensor) -> torch.Tensor:
    """[N, 32] -> [N, 16]: e[j] | e[j+16] << 4."""
    return (e[:, :16] & 15) | ((e[:, 16:] & 15) << 4)


def _qh32(e: torch.Tensor) -> torch.Tensor:
    """[N, 32] 5-bit codes -> [N, 4] bytes of a little-endian uint32, bit i = e[i] >> 4."""
    hb = (e >> 4) & 1
    return _bits(hb.reshape(-1, 4, 8).transpose(1, 2), 1)  # byte b bit i <- e[8b+i]


def _unqh32(b: torch.Tensor) -> torch.Tensor:
    return _unbits(b, 1, 8).transpose(1, 2).reshape(-1, 32)


def encode(w: BlockQuantWeight) -> torch.Tensor:
    """The layer's GGUF bytes, ``uint8 [out, row_bytes]``."""
    g = w.grid
    out_f, in_f = w.shape
    if in_f % g.block:
        raise ValueError(f"input size {in_f} is not a multiple of {g.name}'s block of {g.block}")
    nb = out_f * (in_f // g.block)
    e = w.codes.to(torch.uint8).reshape(nb, g.block)
    d, dmin = _h(w.d.reshape(-1)), _h(w.dmin.reshape(-1))
    per = g.block // g.sub
    sc, m = w.sc.reshape(nb, per), w.m.reshape(nb, per)
    n = g.name
    if n == "Q4_K":
        qs = _bits(e.reshape(nb, 4, 2, 32).transpose(1, 2).reshape(nb, 2, 128), 4)
        parts = [d, dmin, _scales12_k4(sc, m), qs]
    elif n == "Q5_K":
        qs = _bits(e.reshape(nb, 4, 2, 32).transpose(1, 2).reshape(nb, 2, 128), 4)
        qh = _bits((e >> 4).reshape(nb, 8, 32), 1)
        parts = [d, dmin, _scales12_k4(sc, m), qh, qs]
    elif n == "Q2_K":
        qs = _bits(e.reshape(nb, 2, 4, 32).transpose(1, 2).reshape(nb, 4, 64), 2)
        parts = [(sc.to(torch.uint8) & 15) | (m.to(torch.uint8) << 4), qs, d, dmin]
    elif n == "Q3_K":
        qs = _bits(e.reshape(nb, 2, 4, 32).transpose(1, 2).reshape(nb, 4, 64), 2)
        hmask = _bits((e >> 2).reshape(nb, 8, 32), 1)
        parts = [hmask, qs, _scales12_q3(sc), d]
    elif n == "Q6_K":
        ql = _bits(e.reshape(nb, 2, 2, 64).transpose(1, 2).reshape(nb, 2, 128), 4)
        qh = _bits((e >> 4).reshape(nb, 2, 4, 32).transpose(1, 2).reshape(nb, 4, 64), 2)
        parts = [ql, qh, sc.to(torch.int8).view(torch.uint8), d]
    elif n == "Q8_0":
        parts = [d, (e.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)]
    elif n in ("Q4_0", "IQ4_NL"):
        parts = [d, _nib32(e)]
    elif n == "Q4_1":
        parts = [d, _h(-w.dmin.reshape(-1)), _nib32(e)]
    elif n == "Q5_0":
        parts = [d, _qh32(e), _nib32(e)]
    elif n == "Q5_1":
        parts = [d, _h(-w.dmin.reshape(-1)), _qh32(e), _nib32(e)]
    else:
        raise ValueError(f"no layout for GGUF type {n}")
    raw = torch.cat(parts, dim=1)
    assert raw.shape[1] == BLOCK_BYTES[n]
    return raw.reshape(out_f, -1).contiguous()


def decode(raw: torch.Tensor, grid_name: str) -> BlockQuantWeight:
    """The codes and grid that GGUF bytes ``uint8 [out, row_bytes]`` hold."""
    g = get_grid(grid_name)
    out_f = raw.shape[0]
    b = raw.reshape(-1, BLOCK_BYTES[g.name])
    nb = b.shape[0]
    per = g.block // g.sub
    n = g.name
    ones = torch.ones(nb, per, dtype=torch.int16)
    zero16 = torch.zeros(nb, dtype=torch.float16)
    if n in ("Q4_K", "Q5_K"):
        d, dmin = _unh(b[:, 0:2]), _unh(b[:, 2:4])
        sc, m = _unscales12_k4(b[:, 4:16])
        qs = b[:, -128:]
        e = _unbits(qs, 4, 2).reshape(nb, 2, 4, 32).transpose(1, 2).reshape(nb, 256)
        if n == "Q5_K":
            e = e | (_unbits(b[:, 16:48], 1, 8).reshape(nb, 256) << 4)
    elif n == "Q2_K":
        sc, m = (b[:, :16] & 15).to(torch.int16), (b[:, :16] >> 4).to(torch.int16)
        e = _unbits(b[:, 16:80], 2, 4).reshape(nb, 4, 2, 32).transpose(1, 2).reshape(nb, 256)
        d, dmin = _unh(b[:, 80:82]), _unh(b[:, 82:84])
    elif n == "Q3_K":
        hb = _unbits(b[:, :32], 1, 8).reshape(nb, 256)
        e = _unbits(b[:, 32:96], 2, 4).reshape(nb, 4, 2, 32).transpose(1, 2).reshape(nb, 256) | (hb << 2)
        sc, m = _unscales12_q3(b[:, 96:108]), torch.zeros(nb, 16, dtype=torch.int16)
        d, dmin = _unh(b[:, 108:110]), zero16
    elif n == "Q6_K":
        lo = _unbits(b[:, :128], 4, 2).reshape(nb, 2, 2, 64).transpose(1, 2).reshape(nb, 256)
        hi = _unbits(b[:, 128:192], 2, 4).reshape(nb, 4, 2, 32).transpose(1, 2).reshape(nb, 256)
        e = lo | (hi << 4)
        sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.int16)
        m = torch.zeros_like(sc)
        d, dmin = _unh(b[:, 208:210]), zero16
    else:
        d = _unh(b[:, 0:2])
        if n == "Q8_0":
            e = (b[:, 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        else:
            qs = b[:, -16:]
            e = torch.cat([qs & 15, qs >> 4], dim=1)
            if n in ("Q5_0", "Q5_1"):
                e = e | (_unqh32(b[:, -20:-16]) << 4)
        dmin = -_unh(b[:, 2:4]) if g.asym else zero16
        sc, m = ones, (ones if g.asym else torch.zeros_like(ones))
    rows = lambda t: t.reshape(out_f, -1)  # noqa: E731
    return BlockQuantWeight(n, rows(e.to(torch.uint8)), rows(d), rows(dmin), rows(sc.to(torch.int16)),
                            rows(m.to(torch.int16)))
