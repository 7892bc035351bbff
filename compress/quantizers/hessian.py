"""Streaming accumulation of a linear layer's GPTQ Hessian, kept apart from the algorithm.

For a layer ``y = x W^T`` and the proxy objective ``||W x - Wq x||^2`` the Hessian with
respect to each weight row is ``H = 2/n * sum_i x_i x_i^T`` (Frantar et al., 2022, Sec. 3).
Calibration feeds inputs batch by batch; this class keeps the sum of outer products and the
count, so any split of the same rows gives the same ``H`` up to float rounding.

Unlike the GPTQ reference, which counts sequences, ``n`` counts rows (tokens): the scale of
``H`` then does not depend on how the calibration set was batched. GPTQ itself is invariant to
that scale (damping is relative to ``mean(diag(H))``); only the absolute value of the proxy
error in :func:`output_error` depends on it.
"""
from __future__ import annotations

from typing import Optional

import torch


class HessianAccumulator:
    """Running ``H = 2/n * sum x x^T`` over every row of every batch passed to :meth:`add`."""

    def __init__(
        self,
        in_features: int,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
    ) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessian dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n_rows = 0

    def add(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Accumulate layer inputs ``x`` [..., in]; ``mask`` [...] (bool) drops padding rows."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        x = x.reshape(-1, self.in_features)
        if mask is not None:
            x = x[mask.reshape(-1).to(torch.bool)]
        if x.shape[0] == 0:
            return
        x = x.to(device=self._sum.device, dtype=self._sum.dtype)
        # One matrix product per batch; addmm accumulates in place without a temporary.
        self._sum.addmm_(x.t(), x)
        self.n_rows += x.shape[0]

    @property
    def result(self) -> torch.Tensor:
        return self.hessian

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n * sum x x^T`` [in, in]; all zeros before any row was added."""
        if self.n_rows == 0:
            return torch.zeros_like(self._sum)
        return self._sum * (2.0 / self.n_rows)


def output_error(W: torch.Tensor, W_q: torch.Tensor, H: torch.Tensor) -> float:
    """GPTQ's proxy layer error ``tr((W - Wq) H (W - Wq)^T)``.

    With ``H = 2/n sum x x^T`` this is twice the mean, over calibration rows, of the squared
    output error ``||(W - Wq) x||^2``.
    """
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    d = (W.to(dtype) - W_q.to(dtype))
    return float(((d @ H.to(dtype)) * d).sum())


def relative_output_error(W: torch.Tensor, W_q: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(D H D^T) / tr(W H W^T)`` with ``D = W - Wq``: the output error as a fraction of the
    output's own energy, from one product of ``H`` with ``[D; W]``."""
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    W = W.to(dtype)
    both = torch.cat([W - W_q.to(dtype), W])
    e = ((both @ H.to(dtype)) * both).sum(dim=1)
    n = W.shape[0]
    return float(e[:n].sum()) / max(float(e[n:].sum()), 1e-30)
