"""Exact round trips of the bit packer against a slow bit-by-bit reference."""
from __future__ import annotations

import pytest
import torch

from compress.formats.pack import pack, packed_size, unpack


def ref_pack_column(values: list[int], bits: int) -> list[int]:
    """Write every bit of every value into a little-endian stream, one bit at a time."""
    n_words = len(values) * bits // 32
    words = [0] * n_words
    for k, v in enumerate(values):
        for b in range(bits):
            if (v >> b) & 1:
                pos = k * bits + b
                words[pos // 32] |= 1 << (pos % 32)
    # int32 storage: two's complement
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def ref_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference packing along dim 0 of a 2-D tensor, column by column."""
    cols = [ref_pack_column(codes[:, j].tolist(), bits) for j in range(codes.shape[1])]
    return torch.tensor(cols, dtype=torch.int32).t()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_reference_and_round_trips(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (96, 5), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits, dim=0)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_size(96, bits), 5)
    assert torch.equal(packed, ref_pack(codes, bits))
    assert torch.equal(unpack(packed, bits, dim=0), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_along_dim1_equals_transposed_pack(bits: int) -> None:
    g = torch.Generator().manual_seed(100 + bits)
    codes = torch.randint(0, 1 << bits, (3, 64), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits, dim=1)
    assert torch.equal(packed, ref_pack(codes.t(), bits).t())
    assert torch.equal(unpack(packed, bits, dim=1), codes)


def test_extreme_values_round_trip() -> None:
    # All-ones words exercise the sign bit of int32 storage.
    for bits in (2, 3, 4, 8):
        codes = torch.full((32, 2), (1 << bits) - 1, dtype=torch.uint8)
        packed = pack(codes, bits)
        assert torch.all(packed == -1)
        assert torch.equal(unpack(packed, bits), codes)


def test_three_bit_gptq_layout_straddles_word_boundaries() -> None:
    # AutoGPTQ 3-bit: word0 holds values 0..9 and the low 2 bits of value 10; word1 holds
    # bit 2 of value 10, values 11..20 at shift 1 and the low bit of value 21; word2 holds
    # bits 1..2 of value 21 and values 22..31 at shift 2.
    codes = torch.zeros(32, 1, dtype=torch.uint8)
    codes[10] = 0b101
    codes[21] = 0b110
    w = pack(codes, 3)[:, 0].tolist()
    assert w[0] == 0b01 << 30
    assert w[1] == 0b1 | (0b0 << 31)
    assert w[2] == 0b11
    codes = torch.zeros(32, 1, dtype=torch.uint8)
    codes[11] = 7
    codes[22] = 7
    w = pack(codes, 3)[:, 0].tolist()
    assert w == [0, 7 << 1, 7 << 2]


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(32, 1, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(torch.zeros(16, 1, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack(torch.full((8, 1), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="int32"):
        unpack(torch.zeros(3, 1, dtype=torch.int64), 3)
