import pytest
import torch

from compress.quantizers.hessian import HessianAccumulator, output_error


def test_incremental_equals_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    whole = HessianAccumulator(24, dtype=torch.float64)
    whole.add(x)
    parts = HessianAccumulator(24, dtype=torch.float64)
    for chunk in x.reshape(-1, 24).split(7):  # uneven batches, 2-D and 3-D shapes mixed
        parts.add(chunk.unsqueeze(0) if chunk.shape[0] % 2 else chunk)
    rows = x.reshape(-1, 24)
    expected = 2.0 / rows.shape[0] * rows.t() @ rows
    assert parts.n_rows == whole.n_rows == 150
    torch.testing.assert_close(whole.hessian, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts.hessian, expected, rtol=1e-12, atol=1e-12)


def test_float32_incremental_close_to_float64_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 32, generator=g)
    acc = HessianAccumulator(32)
    for chunk in x.split(37):
        acc.add(chunk)
    ref = 2.0 / 4000 * x.double().t() @ x.double()
    torch.testing.assert_close(acc.hessian.double(), ref, rtol=1e-5, atol=1e-5)


def test_mask_drops_padding_rows():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    acc = HessianAccumulator(8)
    acc.add(x, mask=mask)
    kept = x[mask]
    torch.testing.assert_close(acc.hessian, 2.0 / 8 * kept.t() @ kept)
    assert acc.n_rows == 8


def test_rejects_wrong_width_and_starts_at_zero():
    acc = HessianAccumulator(4)
    assert torch.equal(acc.hessian, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="expected 4"):
        acc.add(torch.zeros(3, 5))


def test_output_error_is_twice_mean_squared_output_error():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    W = torch.randn(8, 16, generator=g, dtype=torch.float64)
    Wq = W + 0.1 * torch.randn(8, 16, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(16, dtype=torch.float64)
    acc.add(x)
    direct = 2.0 * ((x @ (W - Wq).t()) ** 2).sum(dim=1).mean()
    assert output_error(W, Wq, acc.hessian) == pytest.approx(float(direct), rel=1e-10)
