"""Fast linears for a quantized layer, chosen per layer by what the CPU kernels can hold.

`QuantLinear` (compress/formats/quant_linear.py) is the reference: it rebuilds the float weight
in every forward, which is what evaluation's numbers mean but 8x slower than fp32 when decoding.
Here each layer gets the first kernel of `KERNELS` that fits it:

- ``torch int4pack``: ``aten._weight_int4pack_mm_for_cpu`` for 2-, 3- and 4-bit codes (a 2- or
  3-bit code is a 4-bit code that leaves the top values unused). The kernel computes
  ``w = (q - 8) * scale + zero_f`` per group of 32/64/128/256 input columns, so our
  ``w = s * (q - z)`` is ``scale = s``, ``zero_f = s * (8 - z)``. A group size that is a multiple
  of an allowed one (per channel included) repeats its scale over the smaller groups; act-order
  layers whose groups each hold `group_size` columns get their input columns permuted once.
- ``torch int8pack``: ``aten._weight_int8pack_mm`` for 8-bit per-channel codes, ``w = s * q8``
  with ``q8 = q - 128``; an asymmetric zero adds ``sum(x) * s * (128 - z)``.
- ``torch fp32 (dequantized at load)``: everything else (8-bit with groups, shapes the kernels
  refuse) holds the dequantized weight, as fast as the original and as large.

Both kernels run with bfloat16 activations, scales and outputs: on this project's CPUs their
float32 variants are 10-50x slower than a float32 matmul (benchmarks/cpu_decode.py), the
bfloat16 ones faster. So the fast path is not bit-equal to the reference: each output carries a
bfloat16 rounding (relative 2^-9), the price llama.cpp and torchao's int4 CPU path pay too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from compress.formats.qweight import QuantizedWeight
from compress.quantizers.base import ActivationScheme

_INT4_GROUPS = (256, 128, 64, 32)  # the group sizes the int4 CPU kernel takes, largest first
_ACT = torch.bfloat16  # the kernels' fast activation dtype on CPU

INT4 = "torch int4pack bf16"
INT8 = "torch int8pack bf16"
DENSE = "torch fp32 (dequantized at load)"
REFERENCE = "torch dequantize per call"


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def _column_order(qw: QuantizedWeight, gs: int) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """(permutation of input columns that makes each group contiguous or None when they already
    are, None) or (None, why no permutation does)."""
    in_f = qw.shape[1]
    g = qw.g_idx.long()
    if torch.equal(g, torch.arange(in_f) // gs):
        return None, None
    counts = torch.bincount(g, minlength=qw.n_groups)
    if counts.numel() != qw.n_groups or bool((counts != gs).any()):
        return None, f"act-order groups of unequal size (g_idx holds {counts.min()}-{counts.max()} columns per group)"
    return torch.argsort(g, stable=True), None


def _int4_group(qw: QuantizedWeight) -> tuple[int, Optional[str]]:
    in_f = qw.shape[1]
    gs = in_f if qw.group_size == -1 or qw.n_groups == 1 else qw.group_size
    for kg in _INT4_GROUPS:
        if gs % kg == 0:
            return kg, None
    return 0, f"group size {gs} is no multiple of {'/'.join(map(str, _INT4_GROUPS))}"


class Int4PackLinear(nn.Module):
    """2/3/4-bit codes through ``aten._weight_int4pack_mm_for_cpu`` (see the module docstring)."""

    kernel = INT4

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor], activations: Optional[ActivationScheme]):
        super().__init__()
        out_f, in_f = qw.shape
        self.in_features, self.out_features, self.activations = in_f, out_f, activations
        gs = in_f if qw.group_size == -1 or qw.n_groups == 1 else qw.group_size
        self.kgroup, _ = _int4_group(qw)
        perm, _ = _column_order(qw, gs)
        codes = qw.codes if perm is None else qw.codes[:, perm]
        self.register_buffer("perm", perm)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 8))
        s = qw.scales.to(torch.float32)
        zf = s * (8 - qw.zeros.to(torch.float32))
        rep = gs // self.kgroup
        sz = torch.stack([s, zf], dim=-1).repeat_interleave(rep, dim=1)  # [out, K/kgroup, 2]
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous().to(_ACT))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            from compress.formats.quant_linear import quantize_activations

            x = quantize_activations(x, self.activations)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(_ACT).contiguous(), self.packed, self.kgroup,
                                                     self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class Int8PackLinear(nn.Module):
    """8-bit per-channel codes through ``aten._weight_int8pack_mm`` (see the module docstring)."""

    kernel = INT8

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor], activations: Optional[ActivationScheme]):
        super().__init__()
        out_f, in_f = qw.shape
        self.in_features, self.out_features, self.activations = in_f, out_f, activations
        self.register_buffer("q8", (qw.codes.to(torch.int16) - 128).to(torch.int8).contiguous())
        s = qw.scales.to(torch.float32)[:, 0]
        self.register_buffer("scales", s.to(_ACT).contiguous())
        corr = s * (128 - qw.zeros.to(torch.float32)[:, 0])  # 0 for a symmetric grid
        self.register_buffer("correction", corr if bool((corr != 0).any()) else None)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            from compress.formats.quant_linear import quantize_activations

            x = quantize_activations(x, self.activations)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(x2.to(_ACT).contiguous(), self.q8, self.scales).to(x.dtype)
        if self.correction is not None:
            y = y + x2.sum(-1, keepdim=True) * self.correction.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


@dataclass(frozen=True)
class Kernel:
    name: str
    why_not: Callable[[QuantizedWeight, torch.device], Optional[str]]  # None: it fits
    build: Callable[[QuantizedWeight, Optional[torch.Tensor], Optional[ActivationScheme]], nn.Module]


def _int4_why_not(qw: QuantizedWeight, device: torch.device) -> Optional[str]:
    out_f, in_f = qw.shape
    if device.type != "cpu" or not _has("_weight_int4pack_mm_for_cpu"):
        return "no int4 CPU kernel here"
    if qw.bits > 4:
        return f"{qw.bits}-bit codes"
    if out_f % 16:
        return f"{out_f} output features (the kernel needs a multiple of 16)"
    kg, why = _int4_group(qw)
    if why:
        return why
    gs = in_f if qw.group_size == -1 or qw.n_groups == 1 else qw.group_size
    return _column_order(qw, gs)[1]


def _int8_why_not(qw: QuantizedWeight, device: torch.device) -> Optional[str]:
    out_f, in_f = qw.shape
    if device.type != "cpu" or not _has("_weight_int8pack_mm"):
        return "no int8 CPU kernel here"
    if qw.bits != 8:
        return f"{qw.bits}-bit codes"
    if qw.n_groups != 1:
        return "8-bit with groups (the kernel takes one scale per output channel)"
    if in_f % 32:
        return f"{in_f} input features (the kernel needs a multiple of 32)"
    return None


def _dense(qw: QuantizedWeight, bias, activations) -> nn.Module:
    from compress.formats.quant_linear import dequantized_linear

    return dequantized_linear(qw, bias, torch.float32, activations)


KERNELS: tuple[Kernel, ...] = (
    Kernel(INT4, _int4_why_not, Int4PackLinear),
    Kernel(INT8, _int8_why_not, Int8PackLinear),
    Kernel(DENSE, lambda qw, device: None, _dense),
)


def choose(qw: QuantizedWeight, device: torch.device) -> Kernel:
    """The first kernel of `KERNELS` that holds this layer on `device`."""
    return next(k for k in KERNELS if k.why_not(qw, device) is None)


def accelerate(model: nn.Module, device: torch.device) -> dict[str, str]:
    """Swap every `QuantLinear` of `model` for its fastest kernel on `device` (CPU); returns
    layer name -> kernel name. Off the CPU the reference modules stay (their CUDA path)."""
    from compress.formats.quant_linear import QuantLinear

    used: dict[str, str] = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QuantLinear):
            continue
        if device.type != "cpu":
            used[name] = REFERENCE
            continue
        qw = mod.quantized_weight()
        k = choose(qw, device)
        model.set_submodule(name, k.build(qw, mod.bias, mod.activations))
        used[name] = k.name
    return used


def summary(used: dict[str, str], dense_label: str) -> str:
    """One line naming the runtime of a speed figure: ``torch int4pack x210`` (most used first),
    or `dense_label` (e.g. ``torch fp32``) for a model without quantized linears."""
    if not used:
        return dense_label
    counts: dict[str, int] = {}
    for k in used.values():
        counts[k] = counts.get(k, 0) + 1
    parts = sorted(counts.items(), key=lambda kv: -kv[1])
    return " + ".join(f"{k} x{n}" for k, n in parts)
