"""Per-input-channel activation magnitudes, the statistic activation-aware methods read.

AWQ (Lin et al., 2023, Sec. 3.2) and SmoothQuant (Xiao et al., 2022, Eq. 4) scale each input
channel by a power of how large that channel's activations are. The mean of |x| over every
calibration row is kept as a running sum and a row count, so any split of the same rows
gives the same result up to float rounding (like ``HessianAccumulator``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from compress.quantizers.base import StatKind
from compress.quantizers.hessian import HessianAccumulator


class ChannelMagnitude:
    """Running mean of ``|x|`` per input channel over every row passed to :meth:`add`."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32,
                 device: Optional[Union[torch.device, str]] = None) -> None:
        self.in_features = in_features
        self._sum = torch.zeros(in_features, dtype=dtype, device=device)
        self.n_rows = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        x = x.reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        self._sum += x.to(device=self._sum.device, dtype=self._sum.dtype).abs().sum(dim=0)
        self.n_rows += x.shape[0]

    @property
    def result(self) -> torch.Tensor:
        """Mean ``|x|`` per channel ``[in]``; zeros before any row was added."""
        return self._sum / max(self.n_rows, 1)


class ChannelAbsMax:
    """Running max of ``|x|`` per input channel (SmoothQuant's ``max(|X_j|)``, Eq. 4)."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32,
                 device: Optional[Union[torch.device, str]] = None) -> None:
        self.in_features = in_features
        self._max = torch.zeros(in_features, dtype=dtype, device=device)
        self.n_rows = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        x = x.reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        m = x.to(device=self._max.device, dtype=self._max.dtype).abs().amax(dim=0)
        torch.maximum(self._max, m, out=self._max)
        self.n_rows += x.shape[0]

    @property
    def result(self) -> torch.Tensor:
        """Max ``|x|`` per channel ``[in]``; zeros before any row was added."""
        return self._max.clone()


def accumulator(kind: StatKind, in_features: int, dtype: torch.dtype, device) -> Union[HessianAccumulator, ChannelMagnitude, ChannelAbsMax]:
    """The accumulator for statistic `kind` (one per linear layer)."""
    if kind == "hessian":
        return HessianAccumulator(in_features, dtype=dtype, device=device)
    if kind == "act_magnitude":
        return ChannelMagnitude(in_features, dtype=dtype, device=device)
    if kind == "act_absmax":
        return ChannelAbsMax(in_features, dtype=dtype, device=device)
    raise ValueError(f"no accumulator for statistic '{kind}'")
