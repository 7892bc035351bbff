"""compressed-tensors `pack-quantized` (``quant_method: compressed-tensors``): what vLLM reads
natively and llm-compressor writes; transformers loads it with the `compressed-tensors` package.

For a linear named ``P`` (compressed-tensors' PackedQuantizationCompressor layout):

  P.weight_packed      int32 [out, ceil(in*bits/32)]  signed codes + 2**(bits-1), a dense
                                                      little-endian bit stream along the input dim
  P.weight_scale       export dtype [out, G]
  P.weight_zero_point  int32 [ceil(out*bits/32), G]   asymmetric only: signed zero points packed
                                                      along the output dim
  P.weight_shape       int64 [2]                      (out, in)
  P.bias               export dtype [out]

A layer with dynamic per-token int8 input activations (W8A8, SmoothQuant) is written in the
``int-quantized`` layout instead (compressed-tensors' IntQuantizationCompressor, what
llm-compressor writes for its "W8A8" preset and vLLM serves with int8 kernels):

  P.weight             int8 [out, in]                 signed codes (code - 128)
  P.weight_scale       export dtype [out, 1]          one scale per output channel
  P.bias               export dtype [out]

with the config group's ``input_activations: {num_bits: 8, type: int, symmetric: true,
strategy: token, dynamic: true}`` and ``format: int-quantized``.

compressed-tensors' grid is signed: ``w = scale * (q - zp)`` with ``q`` in
``[-2**(bits-1), 2**(bits-1) - 1]``. Ours is unsigned with the same scale, so
``q = code - 2**(bits-1)`` and ``zp = zero - 2**(bits-1)`` (0 for our symmetric grids).
The packing itself is the package's own `pack_to_int32`.

Act-order: compressed-tensors >= 0.20 keeps only ``actorder: weight`` (columns processed in
activation order, groups in plain column order), which is GPTQ's act-order with static groups;
a permuted g_idx (``actorder: group``) was removed, so such a plan fails at preflight.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from compress.formats.qweight import QuantizedWeight
from compress.formats.registry import (
    BlockPatcher, Format, LayerScheme, QuantizedLinear, full_name, register_format,
)
from compress.quantizers.base import ActivationScheme, QuantSpec

_FP16_MAX = torch.finfo(torch.float16).max
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
PACKED, INT = "pack-quantized", "int-quantized"
W8A8 = ActivationScheme(bits=8, strategy="token", dynamic=True, sym=True)


def layer_format(activations: Optional[ActivationScheme]) -> str:
    """The compressed-tensors format of a layer: int-quantized when its inputs are quantized."""
    return PACKED if activations is None else INT


def _offset(bits: int) -> int:
    return 1 << (bits - 1)


def linear_tensors(lin: QuantizedLinear, scale_dtype: torch.dtype, lookup: bool = False) -> dict[str, torch.Tensor]:
    """The layer's tensors; `lookup`: an embedding table, int-quantized (8-bit symmetric, any
    group size: weight-only, as transformers loads an embedding)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qw, p = lin.weight, lin.name
    if qw.desc_act:
        raise ValueError(f"{p}: compressed-tensors cannot store a permuted g_idx (actorder 'group')")
    scales = qw.scales.to(torch.float32)
    if not bool(torch.isfinite(scales).all()) or float(scales.abs().max()) > torch.finfo(scale_dtype).max:
        raise ValueError(f"{p}.weight_scale: non-finite or beyond the {scale_dtype} range")
    if bool(((scales != 0) & (scales.to(scale_dtype) == 0)).any()):
        raise ValueError(f"{p}.weight_scale: a scale underflows to 0 in {scale_dtype}")
    off = _offset(qw.bits)
    q = (qw.codes.to(torch.int16) - off).to(torch.int8)
    if lookup:
        if (qw.bits, qw.sym) != (8, True):
            raise ValueError(f"{p}: an int-quantized embedding holds 8-bit symmetric codes, not {qw.bits}-bit "
                             f"{'symmetric' if qw.sym else 'asymmetric'}")
        if bool((qw.zeros.to(torch.int16) != off).any()):
            raise ValueError(f"{p}: a symmetric grid must have zero point {off}")
        return {f"{p}.weight": q.contiguous(), f"{p}.weight_scale": scales.to(scale_dtype).contiguous()}
    if lin.activations is not None:
        if (qw.bits, qw.group_size, qw.sym) != (8, -1, True) or lin.activations != W8A8:
            raise ValueError(f"{p}: int-quantized holds int8 per-channel symmetric weights with dynamic "
                             f"per-token int8 activations, not {qw.bits}-bit group {qw.group_size} with {lin.activations}")
        if bool((qw.zeros.to(torch.int16) != off).any()):
            raise ValueError(f"{p}: a symmetric grid must have zero point {off}")
        out = {f"{p}.weight": q.contiguous(), f"{p}.weight_scale": scales.to(scale_dtype).contiguous()}
        if lin.bias is not None:
            if not bool(torch.isfinite(lin.bias).all()):
                raise ValueError(f"{p}.bias: contains NaN or Inf")
            out[f"{p}.bias"] = lin.bias.detach().to(scale_dtype).contiguous()
        return out
    out = {
        f"{p}.weight_packed": pack_to_int32(q, qw.bits, packed_dim=1),
        f"{p}.weight_scale": scales.to(scale_dtype).contiguous(),
        f"{p}.weight_shape": torch.tensor(list(qw.shape), dtype=torch.int64),
    }
    if not qw.sym:
        zp = (qw.zeros.to(torch.int16) - off).to(torch.int8)
        out[f"{p}.weight_zero_point"] = pack_to_int32(zp, qw.bits, packed_dim=0)
    elif bool((qw.zeros.to(torch.int16) != off).any()):
        raise ValueError(f"{p}: a symmetric grid must have zero point {off}")
    if lin.bias is not None:
        if not bool(torch.isfinite(lin.bias).all()):
            raise ValueError(f"{p}.bias: contains NaN or Inf")
        out[f"{p}.bias"] = lin.bias.detach().to(scale_dtype).contiguous()
    return out


def read_linear(t: dict[str, torch.Tensor], scheme: dict[str, Any], name: str) -> tuple[QuantizedWeight, Optional[torch.Tensor]]:
    """Inverse of :func:`linear_tensors` for one layer's tensors (local keys) and its
    config group's ``weights`` arguments."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits, sym = int(scheme["num_bits"]), bool(scheme["symmetric"])
    if "weight_packed" in t:
        shape = torch.Size([int(v) for v in t["weight_shape"].tolist()])
        q = unpack_from_int32(t["weight_packed"], bits, shape, packed_dim=1)
    else:  # int-quantized: the signed codes as int8
        q = t["weight"]
        if q.dtype != torch.int8 or bits != 8:
            raise ValueError(f"{name}.weight: int-quantized expects int8 codes, got {q.dtype} for {bits} bits")
        shape = q.shape
    out_f, in_f = shape
    scales = t["weight_scale"].to(torch.float32)
    n_groups = scales.shape[1]
    off = _offset(bits)
    if sym:
        zeros = torch.full((out_f, n_groups), off, dtype=torch.uint8)
    else:
        zp = unpack_from_int32(t["weight_zero_point"], bits, torch.Size([out_f, n_groups]), packed_dim=0)
        zeros = (zp.to(torch.int16) + off).to(torch.uint8)
    gs = -1 if scheme.get("strategy") == "channel" else int(scheme["group_size"])
    if scales.shape != (out_f, 1 if gs == -1 else in_f // gs):
        raise ValueError(f"{name}.weight_scale: shape {tuple(scales.shape)} does not fit weight {tuple(shape)}")
    qw = QuantizedWeight(
        codes=(q.to(torch.int16) + off).to(torch.uint8),
        scales=scales,
        zeros=zeros,
        g_idx=torch.arange(in_f, dtype=torch.int32) // (in_f if gs == -1 else gs),
        bits=bits, group_size=gs, sym=sym,
    )
    return qw, t.get("bias")


def _weights_args(s: LayerScheme, actorder: bool):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=s.bits, type="int", symmetric=s.sym, dynamic=False,
        strategy="channel" if s.group_size == -1 else "group",
        group_size=None if s.group_size == -1 else s.group_size,
        actorder="weight" if actorder else None,
    )


def _activation_scheme(args: Optional[dict[str, Any]], name: str) -> Optional[ActivationScheme]:
    """A config group's ``input_activations`` as our scheme (None: weight-only)."""
    if not args:
        return None
    a = ActivationScheme(bits=int(args["num_bits"]), strategy=str(args.get("strategy")),
                         dynamic=args.get("dynamic") is True, sym=bool(args.get("symmetric")))
    if a != W8A8 or args.get("type", "int") != "int":
        raise ValueError(f"{name}: input_activations {args} are not dynamic per-token symmetric int8, "
                         "the only activation scheme compress reads")
    return a


def _activation_args(s: LayerScheme):
    from compressed_tensors.quantization import QuantizationArgs

    a = s.activations
    if a is None:
        return None
    return QuantizationArgs(num_bits=a.bits, type="int", symmetric=a.sym, dynamic=a.dynamic, strategy=a.strategy)


@register_format
class CompressedTensorsFormat(Format):
    name = "compressed-tensors"
    quant_method = "compressed-tensors"
    loaders = "transformers + compressed-tensors (installed with compress), or vLLM"

    def check(self, layer: str, spec: QuantSpec, shape: tuple[int, int], conv1d: bool) -> Optional[str]:
        if conv1d:
            return ("a GPT-2 Conv1D layer, which compressed-tensors does not quantize (it matches "
                    "nn.Linear); use export.format: gptq")
        if not 1 <= spec.bits <= 8:
            return f"pack-quantized holds 1 to 8 bits, not {spec.bits}"
        if spec.activations is not None and (
                (spec.bits, spec.group_size, spec.sym) != (8, -1, True) or spec.activations != W8A8):
            return ("int-quantized (W8A8) holds 8-bit per-channel symmetric weights with dynamic per-token "
                    f"int8 activations, not bits {spec.bits}, group_size {spec.group_size}, sym {spec.sym}; "
                    "remove the quantize.overrides entry that changes it")
        if spec.permutes_columns:
            return ("a permuted g_idx (act-order with dynamic groups), which compressed-tensors no "
                    "longer stores; set quantize.static_groups: true (act-order kept as actorder 'weight')")
        return None

    def check_head(self, spec: QuantSpec, export: Any) -> Optional[str]:
        return None  # the head is one more target of a config group, out of `ignore`

    def check_embedding(self, spec: QuantSpec, export: Any) -> Optional[str]:
        # transformers (5.17) loads a quantized embedding only in the int-quantized layout, which
        # keeps `weight`: its weight init reads `module.weight` of every nn.Embedding, which a
        # pack-quantized table no longer has. vLLM reads no quantized embedding at all.
        if (spec.bits, spec.sym) != (8, True):
            return (f"compressed-tensors stores a quantized embedding as int-quantized 8-bit symmetric (what "
                    f"transformers loads), not {spec.bits}-bit {'symmetric' if spec.sym else 'asymmetric'}; "
                    "set bits: 8, sym: true")
        return None

    def embedding_tensors(self, name: str, weight: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return linear_tensors(QuantizedLinear(name, weight, QuantSpec(weight.bits, weight.group_size, weight.sym)),
                              dtype, lookup=True)

    def embedding_bytes(self, shape: tuple[int, int], spec: QuantSpec, dtype: torch.dtype) -> int:
        out_f, in_f = shape  # int8 codes, one scale per group
        return out_f * in_f + dtype.itemsize * out_f * spec.groups_for(in_f)

    def read_embedding(self, qcfg: dict[str, Any], name: str, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        return read_linear(tensors, _scheme_lookup(qcfg)(name)["weights"], name)[0]

    def linear_tensors(self, lin: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return linear_tensors(lin, dtype)

    def linear_bytes(self, shape: tuple[int, int], spec: QuantSpec, bias: bool, dtype: torch.dtype) -> int:
        out_f, in_f = shape
        n_g, esize = spec.groups_for(in_f), dtype.itemsize
        words = -(-in_f * spec.bits // 32)  # pack_to_int32: ceil(E*B/32) words per row, no padding
        n = 4 * out_f * words + esize * out_f * n_g + 8 * 2  # weight_packed, weight_scale, weight_shape
        if not spec.sym:
            n += 4 * -(-out_f * spec.bits // 32) * n_g  # weight_zero_point, packed along the output dim
        return n + (esize * out_f if bias else 0)

    def quantization_config(self, base: QuantSpec, layers: list[LayerScheme], skipped: list[str],
                            options: dict[str, Any]) -> dict[str, Any]:
        """One config group per distinct layer scheme. The plan's own scheme targets the
        class `Linear`; every other group names its layers exactly, and compressed-tensors
        (like vLLM) prefers an exact name over a class match."""
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

        actorder = bool(options.get("act_order"))
        by_key: dict[tuple, list[LayerScheme]] = {}
        for s in layers:
            by_key.setdefault(s.key, []).append(s)
        # LayerScheme.key; no GGUF grid here, and the plan's grid is a linear's
        base_key = (base.bits, base.group_size, base.sym, base.activations, None, False)
        keys = sorted(by_key, key=lambda k: (k != base_key, str(k)))
        groups = {}
        for g, k in enumerate(keys):
            members = by_key[k]
            targets = ["Linear"] if k == base_key else [s.name for s in members]
            lookup = members[0].lookup  # an embedding: weight-only int-quantized (`linear_tensors`)
            groups[f"group_{g}"] = QuantizationScheme(
                targets=targets, weights=_weights_args(members[0], actorder and not lookup),
                input_activations=_activation_args(members[0]),
                format=INT if lookup else layer_format(members[0].activations),
            )
        formats = {g.format for g in groups.values()}
        qc = QuantizationConfig(
            config_groups=groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
            quantization_status="compressed", ignore=sorted(skipped),
        )
        out = qc.model_dump(exclude={"quant_method"})
        return {"version": compressed_tensors.__version__, "quant_method": self.quant_method,
                "sparsity_config": {}, "transform_config": {}, **out}

    def weights_behind(self, name, shapes, read) -> Optional[int]:
        if name.endswith(".weight_packed"):
            out_f, in_f = (int(v) for v in read(name[: -len("packed")] + "shape").tolist())
            return out_f * in_f
        return 0 if name.endswith((".weight_scale", ".weight_zero_point", ".weight_shape")) else None

    def describe(self, qcfg: dict[str, Any]) -> list[str]:
        lines = [f"quant_method={qcfg.get('quant_method')}, format={qcfg.get('format')}"]
        for gname, g in (qcfg.get("config_groups") or {}).items():
            w = g.get("weights") or {}
            a = g.get("input_activations")
            t = g.get("targets") or []
            grid = (f"bits={w.get('num_bits')}, group_size={w.get('group_size') or -1}, "
                    f"sym={w.get('symmetric')}, actorder={w.get('actorder')}")
            acts = f", activations int{a.get('num_bits')} {a.get('strategy')}" if a else ""
            lines.append(f"{gname}: {grid}{acts} -> {', '.join(t[:3])}{' ...' if len(t) > 3 else ''} ({len(t)} target(s))")
        return lines

    def patcher(self, qcfg: dict[str, Any], dense_dtype: Optional[torch.dtype], block_prefix: str) -> BlockPatcher:
        from compress.formats.quant_linear import QuantLinear, dequantized_linear

        scheme_of = _scheme_lookup(qcfg)

        def patch(block: torch.nn.Module, i: Optional[int], tensors: dict[str, torch.Tensor]) -> list[str]:
            # every quantized layer has a weight_scale; its codes are weight_packed or int8 weight
            names = sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))
            for n in names:
                own = SUFFIXES if f"{n}.weight_packed" in tensors else ("weight", "weight_scale")
                t = {s: tensors.pop(f"{n}.{s}") for s in own}
                for extra in ("weight_zero_point", "bias"):
                    if f"{n}.{extra}" in tensors:
                        t[extra] = tensors.pop(f"{n}.{extra}")
                full = full_name(block_prefix, i, n)
                group = scheme_of(full)
                qw, b = read_linear(t, group["weights"], full)
                acts = _activation_scheme(group.get("input_activations"), full)
                mod = (QuantLinear(qw, b, acts) if dense_dtype is None
                       else dequantized_linear(qw, b, dtype=dense_dtype, activations=acts))
                block.set_submodule(n, mod)
            return names

        return patch


def _scheme_lookup(qcfg: dict[str, Any]):
    """Module name -> its config group (`weights`, `input_activations`, ...), by compressed-tensors'
    own rule: an exact name beats a `re:` pattern, which beats a class name (all our layers are Linear)."""
    import re

    exact, patterns, by_class = {}, [], None
    for group in qcfg.get("config_groups", {}).values():
        for t in group.get("targets", []):
            if t.startswith("re:"):
                patterns.append((t[3:], group))
            elif t in ("Linear", "LinearBase"):
                by_class = group
            else:
                exact[t] = group

    def lookup(name: str) -> dict[str, Any]:
        if name in exact:
            return exact[name]
        for p, w in sorted(patterns, key=lambda pw: pw[0]):
            if re.match(p, name):
                return w
        if by_class is None:
            raise ValueError(f"{name}: no config group of quantization_config targets this layer")
        return by_class

    return lookup
