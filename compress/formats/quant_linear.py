"""A linear layer that holds packed integer codes and dequantizes on the fly.

Used to run a quantized model in our own process (evaluation, parity checks against the
ecosystem loaders) without ever materialising a float copy of the weights between calls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from compress.formats import gptq
from compress.formats.pack import pack, unpack
from compress.formats.qweight import QuantizedWeight


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W = scale * (q - zero)`` rebuilt in every forward.

    Buffers (all persistent, so ``state_dict`` round-trips):
      qweight int32 [in*bits/32, out]  codes packed along the input dim
      zeros   uint8 [out, G]
      scales  float32 [out, G]
      g_idx   int32 [in]
      bias    [out] (only when present)
    """

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.bits = qw.bits
        self.group_size = qw.group_size
        self.sym = qw.sym
        self.desc_act = qw.desc_act
        self.register_buffer("qweight", pack(qw.codes.t(), qw.bits, dim=0))
        self.register_buffer("zeros", qw.zeros.to(torch.uint8).contiguous())
        self.register_buffer("scales", qw.scales.to(torch.float32).contiguous())
        self.register_buffer("g_idx", qw.g_idx.to(torch.int32).contiguous())
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())
        else:
            self.bias = None

    @classmethod
    def from_gptq_tensors(
        cls,
        tensors: gptq.TensorSource,
        prefix: str,
        bits: int,
        group_size: int,
        sym: bool,
    ) -> "QuantLinear":
        """Build from a GPTQ v1 tensor dict (or getter), e.g. a loaded safetensors shard."""
        qw, bias = gptq.read_linear(tensors, prefix, bits, group_size, sym)
        return cls(qw, bias)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(
            codes=unpack(self.qweight, self.bits, dim=0).t().contiguous(),
            scales=self.scales,
            zeros=self.zeros,
            g_idx=self.g_idx,
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            desc_act=self.desc_act,
        )

    def weight_t(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized ``W.T`` [in, out]; transient, never stored on the module."""
        codes = unpack(self.qweight, self.bits, dim=0)  # [in, out]
        g = self.g_idx.long()
        zero = self.zeros.t()[g].to(dtype)  # [in, out]
        scale = self.scales.t()[g].to(dtype)
        return (codes.to(dtype) - zero) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, desc_act={self.desc_act}, "
            f"bias={self.bias is not None}"
        )


def dequantized_linear(
    qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32
) -> nn.Linear:
    """A plain ``nn.Linear`` holding the dequantized weight (the fake-quant path)."""
    out_f, in_f = qw.shape
    # Built on meta and given the dequantized tensor: no initialised weight to copy over.
    layer = nn.Linear(in_f, out_f, bias=bias is not None, dtype=dtype, device="meta")
    layer.weight = nn.Parameter(qw.dequantize(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device=qw.codes.device, dtype=dtype).clone(), requires_grad=False)
    return layer

