"""Bit packing of integer codes into int32 words, independent of any checkpoint format.

Codes are laid out as one little-endian bit stream per packed lane: value ``k`` of the lane
occupies bits ``[bits*k, bits*(k+1))`` of the stream and the stream is cut into 32-bit words.
For 2, 4 and 8 bits this is the familiar ``32/bits`` values per word. For 3 bits it is exactly
the GPTQ/AutoGPTQ layout: 32 values fill 3 words and values 10 and 21 straddle a word
boundary (AutoGPTQ ``QuantLinear.pack``; GPTQModel's ``wf`` table for 3-bit unpacking).
"""
from __future__ import annotations

from math import gcd

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD = 32
_U32 = (1 << 32) - 1


def block_shape(bits: int) -> tuple[int, int]:
    """``(values, words)``: the smallest run of values that fills whole int32 words."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    g = gcd(bits, _WORD)
    return _WORD // g, bits // g


def packed_size(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes; ``n`` must fill whole blocks."""
    n_vals, n_words = block_shape(bits)
    if n % n_vals:
        raise ValueError(f"{bits}-bit packing needs a multiple of {n_vals} values, got {n}")
    return n // n_vals * n_words


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer ``codes`` (each in ``[0, 2**bits)``) into int32 words along ``dim``."""
    n_vals, n_words = block_shape(bits)
    x = codes.movedim(dim, 0).to(torch.int64)
    if x.numel() and (x.min() < 0 or x.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    n = x.shape[0]
    rest = x.shape[1:]
    if n % n_vals:
        raise ValueError(f"{bits}-bit packing needs a multiple of {n_vals} values along dim {dim}, got {n}")
    x = x.reshape(n // n_vals, n_vals, *rest)
    words = torch.zeros((x.shape[0], n_words, *rest), dtype=torch.int64, device=codes.device)
    for k in range(n_vals):
        offset = bits * k
        w, s = divmod(offset, _WORD)
        v = x[:, k]
        words[:, w] |= (v << s) & _U32
        if s + bits > _WORD:  # the value straddles into the next word
            words[:, w + 1] |= v >> (_WORD - s)
    out = _to_int32(words.reshape(-1, *rest))
    return out.movedim(0, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes, ``32/bits`` times longer along ``dim``."""
    n_vals, n_words = block_shape(bits)
    if words.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {words.dtype}")
    x = words.movedim(dim, 0).to(torch.int64) & _U32
    n = x.shape[0]
    rest = x.shape[1:]
    if n % n_words:
        raise ValueError(f"{bits}-bit unpacking needs a multiple of {n_words} words along dim {dim}, got {n}")
    x = x.reshape(n // n_words, n_words, *rest)
    mask = (1 << bits) - 1
    # uint8 from the start (codes are below 2^8): an int64 staging copy would be 8 bytes a code.
    vals = torch.empty((x.shape[0], n_vals, *rest), dtype=torch.uint8, device=words.device)
    for k in range(n_vals):
        w, s = divmod(bits * k, _WORD)
        v = x[:, w] >> s
        if s + bits > _WORD:
            v = v | (x[:, w + 1] << (_WORD - s))
        vals[:, k] = v & mask
    return vals.reshape(-1, *rest).movedim(0, dim).contiguous()
