"""Quantizer registry and the per-layer settings every algorithm receives."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from compress.formats.qweight import QuantizedWeight


@dataclass(frozen=True)
class QuantSpec:
    """Resolved settings for one linear layer (after per-module overrides)."""

    bits: int
    group_size: int = 128  # -1: one group per output channel
    sym: bool = True
    # GPTQ options (ignored by methods that do not use a Hessian)
    damp_percent: float = 0.01
    block_size: int = 128
    desc_act: bool = False
    static_groups: bool = False
    mse_clip: bool = False  # search a shrunk range per group that minimises the error

    def groups_for(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def check_divides(self, in_features: int, layer: str) -> None:
        if self.group_size != -1 and in_features % self.group_size:
            raise ValueError(
                f"quantize.group_size: {self.group_size} does not divide the input size "
                f"{in_features} of layer '{layer}'; choose a divisor or add an override for it"
            )


QuantizeFn = Callable[[torch.Tensor, Optional[torch.Tensor], QuantSpec], QuantizedWeight]


@dataclass(frozen=True)
class Quantizer:
    name: str
    quantize_weight: QuantizeFn
    needs_hessian: bool


QUANTIZERS: dict[str, Quantizer] = {}


def register(name: str, needs_hessian: bool) -> Callable[[QuantizeFn], QuantizeFn]:
    def wrap(fn: QuantizeFn) -> QuantizeFn:
        QUANTIZERS[name] = Quantizer(name, fn, needs_hessian)
        return fn

    return wrap


def get_quantizer(name: str) -> Quantizer:
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise KeyError(
            f"unknown quantization method '{name}'; valid: {', '.join(sorted(QUANTIZERS))}"
        ) from None
