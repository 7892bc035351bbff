"""A linear layer that holds packed integer codes and dequantizes on the fly.

Used to run a quantized model in our own process (evaluation, parity checks against the
ecosystem loaders) without ever materialising a float copy of the weights between calls.
A layer whose artifact records an input-activation scheme (W8A8) quantizes and dequantizes
its input first, exactly as the compressed-tensors reference forward does, so the measured
error is the weight-and-activation error.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from compress.formats import gptq
from compress.formats.pack import pack, unpack
from compress.formats.qweight import QuantizedWeight
from compress.quantizers.base import ActivationScheme


def quantize_activations(x: torch.Tensor, scheme: ActivationScheme) -> torch.Tensor:
    """Dynamic per-token symmetric fake quantization of ``x`` [..., in]: one scale per token,
    ``absmax / ((qmax - qmin) / 2)`` (= absmax / 127.5 for int8), values clamped to
    [qmin, qmax] and rounded half to even, in ``x``'s dtype; an all-zero token gets the dtype's
    eps as its scale. This is compressed-tensors' ``calculate_qparams`` + ``fake_quantize``
    for ``strategy: token, dynamic: true, symmetric: true``. (vLLM's int8 kernel divides by
    127 instead of 127.5: its step is 0.4% larger and nothing is clipped.)"""
    if scheme.strategy != "token" or not scheme.dynamic or not scheme.sym:
        raise ValueError(f"unsupported input-activation scheme {scheme}; only dynamic symmetric per-token")
    qmin, qmax = -(1 << (scheme.bits - 1)), (1 << (scheme.bits - 1)) - 1
    scale = x.abs().amax(dim=-1, keepdim=True) / ((qmax - qmin) / 2)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(x.dtype).eps), scale)
    return torch.round(torch.clamp(x / scale, qmin, qmax)) * scale


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W = scale * (q - zero)`` rebuilt in every forward.

    Buffers (all persistent, so ``state_dict`` round-trips):
      qweight int32 [in*bits/32, out]  codes packed along the input dim
      zeros   uint8 [out, G]
      scales  float32 [out, G]
      g_idx   int32 [in]
      bias    [out] (only when present)
    """

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                 activations: Optional[ActivationScheme] = None) -> None:
        super().__init__()
        self.activations = activations
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
        if self.activations is not None:
            x = quantize_activations(x, self.activations)
        y = x @ self.weight_t(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, desc_act={self.desc_act}, "
            f"bias={self.bias is not None}, activations={self.activations}"
        )


class ActQuantLinear(nn.Linear):
    """An ``nn.Linear`` (dequantized weight) whose input is fake-quantized first (W8A8)."""

    def __init__(self, in_features: int, out_features: int, activations: ActivationScheme, **kw) -> None:
        super().__init__(in_features, out_features, **kw)
        self.activations = activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(quantize_activations(x, self.activations))


def dequantized_linear(
    qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
    activations: Optional[ActivationScheme] = None,
) -> nn.Linear:
    """A plain ``nn.Linear`` holding the dequantized weight (the fake-quant path); with an
    activation scheme, one that fake-quantizes its input too."""
    out_f, in_f = qw.shape
    # Built on meta and given the dequantized tensor: no initialised weight to copy over.
    kw = dict(bias=bias is not None, dtype=dtype, device="meta")
    layer = nn.Linear(in_f, out_f, **kw) if activations is None else ActQuantLinear(in_f, out_f, activations, **kw)
    layer.weight = nn.Parameter(qw.dequantize(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device=qw.codes.device, dtype=dtype).clone(), requires_grad=False)
    return layer

