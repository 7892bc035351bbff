"""GGUF block grids: our codes -> bytes -> gguf-py's dequantizer equals our dequantized weight,
bit for bit, for every type; the bytes read back to the same codes and grid."""
import numpy as np
import pytest
import torch

from compress.formats import gguf_kquants as gk
from compress.formats.qweight import BlockQuantWeight
from compress.quantizers import kgrid


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 0, rows).unsqueeze(1)
    W[1] = 0.0  # a dead row: zero scales must not divide by zero
    W[2, :16] = 5.0  # an outlier sub-block
    W[3] = W[3].abs()  # all positive: the k-quant min clamps to 0
    return W


def _rtn(W: torch.Tensor, name: str) -> BlockQuantWeight:
    grid = kgrid.get_grid(name)
    p = kgrid.fit(W, grid)
    return BlockQuantWeight(name, kgrid.codes(W, p, grid), p.d, p.dmin, p.sc, p.m)


@pytest.mark.parametrize("name", sorted(kgrid.GRIDS))
def test_bytes_dequantize_in_gguf_as_ours(name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    W = _weight(6, 512)
    w = _rtn(W, name)
    raw = gk.encode(w)
    assert raw.shape == (6, gk.row_bytes(w.grid, 512))
    ref = dequantize(raw.numpy(), GGMLQuantizationType[name])
    ours = w.dequantize(torch.float32).numpy()
    assert ref.dtype == np.float32 and ref.shape == ours.shape
    np.testing.assert_array_equal(ref.view(np.uint32), ours.view(np.uint32))
    back = gk.decode(raw, name)
    for f in ("codes", "d", "dmin", "sc", "m"):
        a, b = getattr(back, f), getattr(w, f)
        if f in ("d", "dmin"):
            a, b = a.view(torch.int16), b.to(torch.float16).view(torch.int16)
        assert torch.equal(a, b.to(a.dtype)), f


@pytest.mark.parametrize("name", sorted(kgrid.GRIDS))
def test_grid_values_in_range_and_error_small(name):
    grid = kgrid.get_grid(name)
    W = _weight(8, 256, seed=1)
    w = _rtn(W, name)
    assert int(w.codes.max()) < len(grid.levels)
    if grid.two_level:
        lo, hi = grid.sc_range
        assert int(w.sc.min()) >= lo and int(w.sc.max()) <= hi
        assert int(w.m.min()) >= 0 and int(w.m.max()) <= grid.m_max
    rows = [0, 4, 5, 6, 7]
    err = (w.dequantize()[rows] - W[rows]).pow(2).sum() / W[rows].pow(2).sum()
    # relative error of a b-bit grid: well under the step of a 2-bit grid, shrinking with bits
    assert float(err) < {2: 0.2, 3: 0.06, 4: 0.02, 5: 0.005, 6: 0.0015, 8: 1e-4}[grid.bits], float(err)
    assert torch.equal(w.dequantize()[1], torch.zeros(256))


def test_more_bits_less_error():
    W = _weight(16, 512, seed=2)
    errs = [float((_rtn(W, n).dequantize() - W).pow(2).sum()) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")]
    assert errs == sorted(errs, reverse=True), errs
