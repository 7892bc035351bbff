"""GPTQ v1 checkpoint layout (``quant_method: gptq``, ``checkpoint_format: gptq``).

What AutoGPTQ, GPTQModel and transformers+optimum load. For a linear named ``P``:

  P.qweight  int32 [in*bits/32, out]   codes packed along the input dim (``formats.pack``)
  P.qzeros   int32 [G, out*bits/32]    ``zero - 1`` packed along the output dim (v1 convention)
  P.scales   fp16  [G, out]
  P.g_idx    int32 [in]                group of each input column (a permutation under desc_act)
  P.bias     fp16  [out]               only when the layer has a bias

Per-channel quantization (``group_size = -1``) is stored with ``G = 1``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from compress.formats.pack import pack, packed_size, unpack
from compress.formats.qweight import QuantizedWeight
from compress.formats.registry import BlockPatcher, Format, LayerScheme, QuantizedLinear, full_name, register_format
from compress.quantizers.base import QuantSpec

TensorSource = Union[Mapping[str, torch.Tensor], Callable[[str], Optional[torch.Tensor]]]

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# The largest finite fp16: scales beyond it would be written as inf.
_FP16_MAX = torch.finfo(torch.float16).max


def _check_dims(prefix: str, out_f: int, in_f: int, bits: int) -> None:
    try:
        packed_size(in_f, bits)
        packed_size(out_f, bits)
    except ValueError as e:
        raise ValueError(f"{prefix}: shape [{out_f}, {in_f}] cannot use the GPTQ layout: {e}") from None


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The g_idx of a layer quantized in natural column order."""
    gs = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // gs


def linear_tensors(
    prefix: str, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None
) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of one quantized linear layer, keyed ``f"{prefix}.{suffix}"``."""
    out_f, in_f = qw.shape
    bits = qw.bits
    _check_dims(prefix, out_f, in_f, bits)
    if not qw.desc_act and not torch.equal(qw.g_idx.to(torch.int32), trivial_g_idx(in_f, qw.group_size)):
        # Kernels for desc_act=False (exllama, marlin) ignore g_idx: the file would load wrong.
        raise ValueError(f"{prefix}: g_idx is permuted but desc_act is False; set desc_act=True")
    zeros = qw.zeros.to(torch.int64)
    if bool((zeros == 0).any()):
        # v1 stores zero-1; a zero of 0 wraps to 2**bits-1 and GPTQModel's packed +1 carry
        # corrupts the neighbouring zero point. Sym grids never hit this (zero = 2**(bits-1)).
        raise ValueError(
            f"{prefix}: an asymmetric zero point of 0 cannot be stored in GPTQ v1 "
            "(checkpoint_format 'gptq'); use quantize.sym=true or clamp zeros to >= 1"
        )
    scales = qw.scales.to(torch.float32)
    if not bool(torch.isfinite(scales).all()) or float(scales.abs().max()) > _FP16_MAX:
        raise ValueError(f"{prefix}.scales: non-finite or beyond the fp16 range")
    if bool(((scales != 0) & (scales.to(torch.float16) == 0)).any()):
        # A scale below fp16's smallest subnormal would silently become 0 on disk.
        raise ValueError(f"{prefix}.scales: a scale underflows to 0 in fp16")
    out = {
        f"{prefix}.qweight": pack(qw.codes.t(), bits, dim=0),
        f"{prefix}.qzeros": pack((zeros - 1).t(), bits, dim=1),
        f"{prefix}.scales": scales.t().to(torch.float16).contiguous(),
        f"{prefix}.g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        if not bool(torch.isfinite(bias).all()):
            raise ValueError(f"{prefix}.bias: contains NaN or Inf")
        out[f"{prefix}.bias"] = bias.detach().to(torch.float16).contiguous()
    return out


def _getter(source: TensorSource) -> Callable[[str], Optional[torch.Tensor]]:
    if callable(source):
        return source
    return source.get


def read_linear(
    source: TensorSource, prefix: str, bits: int, group_size: int, sym: bool
) -> tuple[QuantizedWeight, Optional[torch.Tensor]]:
    """Inverse of :func:`linear_tensors`.

    Scales come back as float32 holding the file's fp16 values exactly, so our dequantization
    sees the same weights as every other GPTQ loader.
    """
    get = _getter(source)
    t = {}
    for s in SUFFIXES:
        v = get(f"{prefix}.{s}")
        if v is None:
            raise KeyError(f"GPTQ tensor '{prefix}.{s}' is missing")
        t[s] = v
    codes = unpack(t["qweight"], bits, dim=0).t().contiguous()  # [out, in]
    zeros = unpack(t["qzeros"], bits, dim=1).to(torch.int64) + 1  # v1: stored zero-1
    out_f, in_f = codes.shape
    if zeros.shape[1] != out_f or t["scales"].shape != (zeros.shape[0], out_f):
        raise ValueError(
            f"{prefix}: qweight {tuple(t['qweight'].shape)}, qzeros {tuple(t['qzeros'].shape)} "
            f"and scales {tuple(t['scales'].shape)} disagree on the output size"
        )
    if int(zeros.max()) > (1 << bits) - 1:
        raise ValueError(f"{prefix}.qzeros: holds a wrapped zero point (zero 0 under v1)")
    g_idx = t["g_idx"].to(torch.int32)
    qw = QuantizedWeight(
        codes=codes,
        scales=t["scales"].to(torch.float32).t().contiguous(),
        zeros=zeros.t().contiguous().to(torch.uint8),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=not torch.equal(g_idx, trivial_g_idx(in_f, group_size)),
    )
    bias = get(f"{prefix}.bias")
    return qw, bias


def _check_dynamic(dynamic: Mapping[str, Mapping[str, Any]]) -> None:
    for key in dynamic:
        pattern = key[2:] if key.startswith(("+:", "-:")) else key
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"quantization_config.dynamic: bad regex '{key}': {e}") from None


def quantization_config(
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    *,
    modules_to_not_convert: Sequence[str] = (),
    dynamic: Optional[Mapping[str, Mapping[str, Any]]] = None,
    modules_in_block_to_quantize: Optional[Sequence[Sequence[str]]] = None,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    meta: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """``config.json["quantization_config"]``; also the content of ``quantize_config.json``.

    Loaders differ in how they skip layers: GPTQModel reads ``dynamic`` (``"-:regex"`` skips a
    module, ``"+:regex": {...}`` overrides bits/group_size), transformers+optimum only read
    ``modules_in_block_to_quantize`` (module-name suffixes within a decoder block).
    ``modules_to_not_convert`` (full module names) is written as ``-:`` entries of ``dynamic``.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"quantize.bits: GPTQ supports 2, 3, 4 or 8 bits, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"quantize.group_size: must be -1 or positive, got {group_size}")
    if not 0 < damp_percent < 1:
        raise ValueError(f"quantize.damp_percent: must lie in (0, 1), got {damp_percent}")
    dyn: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (dynamic or {}).items()}
    for name in modules_to_not_convert:
        dyn[f"-:^{re.escape(name)}$"] = {}
    _check_dynamic(dyn)
    meta = dict(meta or {})
    if not sym or any(v.get("sym") is False for v in dyn.values()):
        meta["quantizer"] = _with_v2_era_tag(meta.get("quantizer", []))
    cfg: dict[str, Any] = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "format": "gptq",
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "desc_act": desc_act,
        # GAR is a quantization-time ordering; the file's g_idx already says what was done.
        "act_group_aware": False,
        "damp_percent": damp_percent,
        "true_sequential": true_sequential,
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": meta,
    }
    if dyn:
        cfg["dynamic"] = dyn
    if modules_in_block_to_quantize is not None:
        cfg["modules_in_block_to_quantize"] = [list(g) for g in modules_in_block_to_quantize]
    return cfg


# GPTQModel loads an asymmetric v1 file only when `meta.quantizer` names a producer of its v2
# era (gptqmodel >= 0.9.0): early GPTQ code stored a zero point of 0 as a wrapped -1, which its
# v1->v2 conversion (+1 on the packed zeros) turns into a carry that corrupts the neighbour.
# linear_tensors refuses a zero of 0, so our files keep the v2-era contract, and the tag says so
# in the one place the loader reads. transformers/optimum and vLLM ignore it.
V2_ERA_TAG = "gptqmodel:0.9.0"


def _with_v2_era_tag(quantizer: Any) -> list[str]:
    tags = [quantizer] if isinstance(quantizer, str) else list(quantizer)
    return tags if any(str(t).lower().startswith("gptqmodel:") for t in tags) else tags + [V2_ERA_TAG]


def _dynamic_match(name: str, dynamic: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The `+:` (or bare) entry of GPTQModel's `dynamic` that applies to module `name`: the
    first whose regex matches, as GPTQModel reads it."""
    for key, value in dynamic.items():
        if key.startswith("-:"):
            continue
        pattern = key[2:] if key.startswith("+:") else key
        if re.match(pattern, name):
            return dict(value)
    return {}


@register_format
class GPTQFormat(Format):
    """GPTQ v1 safetensors: GPTQModel, transformers + optimum, vLLM's gptq/marlin kernels."""

    name = "gptq"
    quant_method = "gptq"
    loaders = "gptqmodel + optimum (transformers), or vLLM"

    def check(self, layer: str, spec: QuantSpec, shape: tuple[int, int], conv1d: bool) -> Optional[str]:
        if spec.activations is not None:
            return ("GPTQ holds weight-only quantization, not quantized activations (W8A8); "
                    "use export.format: compressed-tensors")
        if spec.bits not in (2, 3, 4, 8):
            return f"GPTQ stores 2, 3, 4 or 8 bits, not {spec.bits}"
        out_f, in_f = shape
        try:
            packed_size(in_f, spec.bits)
            packed_size(out_f, spec.bits)
        except ValueError as e:
            return f"shape [{out_f}, {in_f}] cannot use the GPTQ layout: {e}"
        return None

    def check_head(self, spec: QuantSpec, export: Any) -> Optional[str]:
        # GPTQModel and vLLM read `lm_head: true`, but transformers (optimum 2.3's
        # GPTQQuantizer.convert_model) swaps only the linears under the block list: a quantized
        # head would be left unread and randomly initialised there.
        return ("gptq artifacts keep the lm_head in export.dtype (transformers' GPTQ loader replaces only "
                "the decoder blocks' linears and would not read a quantized head); use compressed-tensors, "
                "onnx or gguf, or remove quantize.lm_head")

    def linear_tensors(self, lin: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        # GPTQ kernels read fp16 scales whatever the model's dtype
        if lin.activations is not None:
            raise ValueError(f"{lin.name}: the GPTQ format holds weight-only quantization")
        return linear_tensors(lin.name, lin.weight, lin.bias)

    def linear_bytes(self, shape: tuple[int, int], spec: QuantSpec, bias: bool, dtype: torch.dtype) -> int:
        out_f, in_f = shape
        n_g = spec.groups_for(in_f)
        n = 4 * packed_size(in_f, spec.bits) * out_f  # qweight
        n += 4 * n_g * packed_size(out_f, spec.bits) + 2 * n_g * out_f + 4 * in_f  # qzeros, fp16 scales, g_idx
        return n + (2 * out_f if bias else 0)  # the bias is fp16 whatever export.dtype says

    def quantization_config(self, base: QuantSpec, layers: list[LayerScheme], skipped: list[str],
                            options: dict[str, Any]) -> dict[str, Any]:
        # Per-layer grids that differ from the plan's go into GPTQModel's `dynamic` map; act-order
        # needs no entry (a permuted layer implies the global desc_act, which kernels honour).
        dynamic = {}
        for s in layers:
            diff = {k: v for k, v in (("bits", s.bits), ("group_size", s.group_size), ("sym", s.sym))
                    if v != getattr(base, k)}
            if diff:
                dynamic[f"+:^{re.escape(s.name)}$"] = diff
        return quantization_config(
            base.bits, base.group_size, base.sym, any(s.permuted for s in layers),
            modules_to_not_convert=skipped, dynamic=dynamic or None,
            damp_percent=options.get("damp_percent", 0.01), true_sequential=options.get("propagate", True),
            meta=options.get("meta"),
        )

    def side_files(self, qcfg: dict[str, Any]) -> dict[str, bytes]:
        import json

        return {"quantize_config.json": (json.dumps(qcfg, indent=2, sort_keys=True) + "\n").encode()}

    def weights_behind(self, name, shapes, read) -> Optional[int]:
        if name.endswith(".qweight"):
            return shapes[name][1] * shapes[name[: -len("qweight")] + "g_idx"][0]  # out x in
        return 0 if name.endswith((".qzeros", ".scales", ".g_idx")) else None

    def describe(self, qcfg: dict[str, Any]) -> list[str]:
        keys = ("quant_method", "checkpoint_format", "bits", "group_size", "sym", "desc_act")
        lines = [", ".join(f"{k}={qcfg.get(k)}" for k in keys if k in qcfg)]
        dyn = qcfg.get("dynamic") or {}
        if dyn:
            lines.append(f"overrides: {len(dyn)} dynamic rule(s): {', '.join(list(dyn)[:4])}")
        return lines

    def patcher(self, qcfg: dict[str, Any], dense_dtype: Optional[torch.dtype], block_prefix: str) -> BlockPatcher:
        from compress.formats.quant_linear import QuantLinear, dequantized_linear

        sym = bool(qcfg.get("sym", True))
        dynamic = qcfg.get("dynamic") or {}

        def patch(block: torch.nn.Module, i: Optional[int], tensors: dict[str, torch.Tensor]) -> list[str]:
            names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
            for n in names:
                t = {s: tensors.pop(f"{n}.{s}") for s in SUFFIXES}
                bias = tensors.pop(f"{n}.bias", None)
                if bias is not None:
                    t["bias"] = bias
                bits, gs = _layer_geometry(t)
                layer_sym = bool(_dynamic_match(full_name(block_prefix, i, n), dynamic).get("sym", sym))
                qw, b = read_linear(lambda k, t=t, n=n: t.get(k[len(n) + 1 :]), n, bits, gs, layer_sym)
                mod = QuantLinear(qw, b) if dense_dtype is None else dequantized_linear(qw, b, dtype=dense_dtype)
                block.set_submodule(n, mod)
            return names

        return patch


def _layer_geometry(t: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """Bits and group size of one linear, read from its tensor shapes (overrides may differ)."""
    in_f = t["g_idx"].numel()
    bits = t["qweight"].shape[0] * 32 // in_f
    n_groups = t["scales"].shape[0]
    return bits, (-1 if n_groups == 1 else in_f // n_groups)
