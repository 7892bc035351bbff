"""AWQ GEMM checkpoint layout (``quant_method: awq``, ``version: gemm``), as AutoAWQ and
llm-compressor write it and transformers (through GPTQModel's AWQ kernels) and vLLM read it.

For a linear named ``P`` with ``in`` inputs, ``out`` outputs and groups of ``gs`` inputs:

  P.qweight  int32 [in, out/8]       4-bit codes packed along the OUTPUT dim, 8 per word, in
                                     AWQ's interleaved order: nibble k of a word holds output
                                     column ``8*w + AWQ_ORDER[k]``
  P.qzeros   int32 [in/gs, out/8]    raw zero points (no -1 offset, unlike GPTQ v1), packed
                                     the same way
  P.scales   fp16  [in/gs, out]
  P.bias     fp16  [out]             only when the layer has a bias

``w = (q - z) * s`` per group, our grid's convention. The order is AutoAWQ's
``pack_awq`` (``[0, 2, 4, 6, 1, 3, 5, 7]``), undone by GPTQModel's ``reverse_awq_order``
(``[0, 4, 1, 5, 2, 6, 3, 7]``) in ``dequantize_gemm``. The format holds one grid for the whole
model: asymmetric 4-bit with a group size (``zero_point: true``); unquantized linears are
listed in ``modules_to_not_convert``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from compress.formats.pack import pack, unpack
from compress.formats.qweight import QuantizedWeight
from compress.formats.registry import BlockPatcher, Format, LayerScheme, QuantizedLinear, register_format
from compress.quantizers.base import QuantSpec

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
SUFFIXES = ("qweight", "qzeros", "scales")
BITS = 4
GROUP_SIZES = (16, 32, 64, 128)  # GPTQModel's AwqTorchLinear.SUPPORTS_GROUP_SIZE, less -1
_FP16_MAX = torch.finfo(torch.float16).max


def pack_columns(x: torch.Tensor) -> torch.Tensor:
    """``x`` [rows, out] of 4-bit values -> int32 [rows, out/8] in AWQ's interleaved order."""
    rows, out_f = x.shape
    inter = x.reshape(rows, out_f // 8, 8)[..., list(AWQ_ORDER)].reshape(rows, out_f)
    return pack(inter, BITS, dim=1)


def unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: uint8 [rows, out]."""
    inter = unpack(words, BITS, dim=1)
    rows, out_f = inter.shape
    return inter.reshape(rows, out_f // 8, 8)[..., list(AWQ_REVERSE_ORDER)].reshape(rows, out_f).contiguous()


def linear_tensors(prefix: str, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    out_f, in_f = qw.shape
    if (qw.bits, qw.sym) != (BITS, False) or qw.group_size not in GROUP_SIZES:
        raise ValueError(f"{prefix}: AWQ GEMM holds asymmetric 4-bit groups of {GROUP_SIZES}, not "
                         f"{qw.bits}-bit group {qw.group_size} sym={qw.sym}")
    if out_f % 8:
        raise ValueError(f"{prefix}: AWQ packs 8 output columns per word; {out_f} outputs")
    if not torch.equal(qw.g_idx.to(torch.int32), torch.arange(in_f, dtype=torch.int32) // qw.group_size):
        raise ValueError(f"{prefix}: AWQ GEMM has no g_idx; a permuted grouping cannot be stored")
    scales = qw.scales.to(torch.float32)
    if not bool(torch.isfinite(scales).all()) or float(scales.abs().max()) > _FP16_MAX:
        raise ValueError(f"{prefix}.scales: non-finite or beyond the fp16 range")
    if bool(((scales != 0) & (scales.to(torch.float16) == 0)).any()):
        raise ValueError(f"{prefix}.scales: a scale underflows to 0 in fp16")
    out = {
        f"{prefix}.qweight": pack_columns(qw.codes.t()),
        f"{prefix}.qzeros": pack_columns(qw.zeros.t()),
        f"{prefix}.scales": scales.t().to(torch.float16).contiguous(),
    }
    if bias is not None:
        if not bool(torch.isfinite(bias).all()):
            raise ValueError(f"{prefix}.bias: contains NaN or Inf")
        out[f"{prefix}.bias"] = bias.detach().to(torch.float16).contiguous()
    return out


def read_linear(t: dict[str, torch.Tensor], name: str) -> tuple[QuantizedWeight, Optional[torch.Tensor]]:
    """Inverse of :func:`linear_tensors` for one layer's tensors (local keys)."""
    codes = unpack_columns(t["qweight"])  # [in, out]
    zeros = unpack_columns(t["qzeros"])  # [G, out]
    scales = t["scales"].to(torch.float32)
    in_f, out_f = codes.shape
    n_groups = scales.shape[0]
    if scales.shape[1] != out_f or zeros.shape != (n_groups, out_f) or in_f % n_groups:
        raise ValueError(f"{name}: qweight {tuple(t['qweight'].shape)}, qzeros {tuple(t['qzeros'].shape)} and "
                         f"scales {tuple(t['scales'].shape)} disagree")
    gs = in_f // n_groups
    qw = QuantizedWeight(
        codes=codes.t().contiguous(), scales=scales.t().contiguous(), zeros=zeros.t().contiguous(),
        g_idx=torch.arange(in_f, dtype=torch.int32) // gs, bits=BITS, group_size=gs, sym=False,
    )
    return qw, t.get("bias")


@register_format
class AWQFormat(Format):
    """AWQ GEMM safetensors: transformers + gptqmodel's AWQ kernels, AutoAWQ, vLLM's awq/awq_marlin."""

    name = "awq"
    quant_method = "awq"
    loaders = "transformers + gptqmodel (AWQ kernels), or vLLM"

    def check(self, layer: str, spec: QuantSpec, shape: tuple[int, int], conv1d: bool) -> Optional[str]:
        if spec.activations is not None:
            return "AWQ holds weight-only quantization, not quantized activations (W8A8); use export.format: compressed-tensors"
        if conv1d:
            return "a GPT-2 Conv1D layer, which the AWQ loaders do not replace (they match nn.Linear); use export.format: gptq"
        if spec.bits != BITS:
            return f"AWQ GEMM holds 4-bit weights, not {spec.bits} (quantize.bits: 4)"
        if spec.sym:
            return "AWQ GEMM holds asymmetric grids with zero points (quantize.sym: false)"
        if spec.group_size not in GROUP_SIZES:
            return (f"AWQ GEMM needs a group size of {', '.join(map(str, GROUP_SIZES))}, not {spec.group_size} "
                    "(quantize.group_size)")
        if spec.permutes_columns:
            return "a permuted g_idx (act-order with dynamic groups), which AWQ cannot store; set quantize.static_groups: true"
        if shape[0] % 8:
            return f"{shape[0]} output features; AWQ packs 8 output columns per int32 word"
        return None

    def check_plan(self, specs: dict[str, QuantSpec]) -> Optional[str]:
        grids = {(s.bits, s.group_size, s.sym) for s in specs.values()}
        if len(grids) > 1:
            first = next(iter(specs))
            other = next(n for n, s in specs.items() if (s.bits, s.group_size, s.sym) != (
                specs[first].bits, specs[first].group_size, specs[first].sym))
            return (f"AWQ GEMM holds one grid for every layer, but '{other}' differs from '{first}' "
                    "(quantize.overrides may only skip layers under this format)")
        return None

    def linear_tensors(self, lin: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if lin.activations is not None:
            raise ValueError(f"{lin.name}: the AWQ format holds weight-only quantization")
        return linear_tensors(lin.name, lin.weight, lin.bias)

    def quantization_config(self, base: QuantSpec, layers: list[LayerScheme], skipped: list[str],
                            options: dict[str, Any]) -> dict[str, Any]:
        grids = {(s.bits, s.group_size, s.sym) for s in layers}
        if grids - {(BITS, base.group_size, False)}:
            raise ValueError(f"export.format: awq holds one asymmetric 4-bit grid, got {sorted(grids)}")
        return {"quant_method": "awq", "version": "gemm", "bits": BITS, "group_size": base.group_size,
                "zero_point": True, "modules_to_not_convert": sorted(skipped) or None}

    def weights_behind(self, name, shapes, read) -> Optional[int]:
        if name.endswith(".qweight"):
            rows, words = shapes[name]
            return rows * words * 8
        return 0 if name.endswith((".qzeros", ".scales")) else None

    def describe(self, qcfg: dict[str, Any]) -> list[str]:
        keys = ("quant_method", "version", "bits", "group_size", "zero_point")
        lines = [", ".join(f"{k}={qcfg.get(k)}" for k in keys if k in qcfg)]
        skip = qcfg.get("modules_to_not_convert") or []
        if skip:
            lines.append(f"not converted: {len(skip)} module(s): {', '.join(skip[:4])}{' ...' if len(skip) > 4 else ''}")
        return lines

    def patcher(self, qcfg: dict[str, Any], dense_dtype: Optional[torch.dtype], block_prefix: str) -> BlockPatcher:
        from compress.formats.quant_linear import QuantLinear, dequantized_linear

        if int(qcfg.get("bits", BITS)) != BITS or not qcfg.get("zero_point", True) or \
                str(qcfg.get("version", "gemm")).lower() != "gemm":
            raise ValueError(f"quantization_config: compress reads AWQ GEMM 4-bit with zero points, not {qcfg}")

        def patch(block: torch.nn.Module, i: int, tensors: dict[str, torch.Tensor]) -> list[str]:
            names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
            for n in names:
                t = {s: tensors.pop(f"{n}.{s}") for s in SUFFIXES}
                if f"{n}.bias" in tensors:
                    t["bias"] = tensors.pop(f"{n}.bias")
                qw, b = read_linear(t, f"{block_prefix}{i}.{n}")
                mod = QuantLinear(qw, b) if dense_dtype is None else dequantized_linear(qw, b, dtype=dense_dtype)
                block.set_submodule(n, mod)
            return names

        return patch
