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


class _PerChannel:
    """A running reduction per input channel over every row passed to :meth:`add`."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32,
                 device: Optional[Union[torch.device, str]] = None) -> None:
        self.in_features = in_features
        self._acc = torch.zeros(in_features, dtype=dtype, device=device)
        self.n_rows = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        x = x.reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        self._update(x.to(device=self._acc.device, dtype=self._acc.dtype).abs())
        self.n_rows += x.shape[0]

    def _update(self, abs_x: torch.Tensor) -> None:
        raise NotImplementedError


class ChannelMagnitude(_PerChannel):
    """Running mean of ``|x|`` per input channel over every row passed to :meth:`add`."""

    def _update(self, abs_x: torch.Tensor) -> None:
        self._acc += abs_x.sum(dim=0)

    @property
    def result(self) -> torch.Tensor:
        """Mean ``|x|`` per channel ``[in]``; zeros before any row was added."""
        return self._acc / max(self.n_rows, 1)


class ChannelAbsMax(_PerChannel):
    """Running max of ``|x|`` per input channel (SmoothQuant's ``max(|X_j|)``, Eq. 4)."""

    def _update(self, abs_x: torch.Tensor) -> None:
        torch.maximum(self._acc, abs_x.amax(dim=0), out=self._acc)

    @property
    def result(self) -> torch.Tensor:
        """Max ``|x|`` per channel ``[in]``; zeros before any row was added."""
        return self._acc.clone()


def accumulator(kind: StatKind, in_features: int, dtype: torch.dtype, device) -> Union[HessianAccumulator, ChannelMagnitude, ChannelAbsMax]:
    """The accumulator for statistic `kind` (one per linear layer)."""
    if kind == "hessian":
        return HessianAccumulator(in_features, dtype=dtype, device=device)
    if kind == "act_magnitude":
        return ChannelMagnitude(in_features, dtype=dtype, device=device)
    if kind == "act_absmax":
        return ChannelAbsMax(in_features, dtype=dtype, device=device)
    raise ValueError(f"no accumulator for statistic '{kind}'")
