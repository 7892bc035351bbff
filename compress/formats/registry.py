"""On-disk formats, chosen by `export.format`: one writer/reader per format, one registry.

A format receives each quantized linear as a `QuantizedLinear` (codes, scales, zeros, the
spec used, an optional activation scheme) and lays it out; it derives the per-layer metadata
of its `quantization_config` from the layers it was given; it says at preflight, before any
quantization, which layer schemes it cannot hold; and it reads its own artifacts back for
evaluation (a block patcher that swaps in modules holding the stored codes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch

from compress.formats.qweight import QuantizedWeight
from compress.quantizers.base import ActivationScheme, QuantSpec  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class QuantizedLinear:
    """One layer as a writer receives it."""

    name: str  # full module name, e.g. model.layers.0.self_attn.q_proj
    weight: QuantizedWeight
    spec: QuantSpec  # the grid the method used for this layer
    bias: Optional[torch.Tensor] = None
    activations: Optional[ActivationScheme] = None


@dataclass(frozen=True)
class LayerScheme:
    """A layer's scheme as recorded in a format's metadata (no tensors)."""

    name: str
    bits: int
    group_size: int
    sym: bool
    permuted: bool  # g_idx not the plain column order (act-order with dynamic groups)
    activations: Optional[ActivationScheme] = None

    @classmethod
    def of(cls, lin: QuantizedLinear) -> "LayerScheme":
        w = lin.weight
        return cls(lin.name, w.bits, w.group_size, w.sym, w.desc_act, lin.activations)

    @property
    def key(self) -> tuple:
        return (self.bits, self.group_size, self.sym, self.activations)


# (block, block index, the block's tensors by local name) -> names of the modules it replaced
BlockPatcher = Callable[[torch.nn.Module, int, dict[str, torch.Tensor]], list[str]]


class Format:
    """What every on-disk format provides. Subclasses register with `@register_format`."""

    name: ClassVar[str]
    quant_method: ClassVar[str]  # config.json quantization_config.quant_method of its artifacts
    loaders: ClassVar[str]  # what loads it, for the end-of-run message and the card

    def check(self, layer: str, spec: QuantSpec, shape: tuple[int, int], conv1d: bool) -> Optional[str]:
        """Why this format cannot hold `spec` for `layer` (None when it can)."""
        raise NotImplementedError

    def check_plan(self, specs: dict[str, QuantSpec]) -> Optional[str]:
        """Why this format cannot hold the plan's layers together (None when it can): for a
        format with one grid per model, layers whose overrides differ. Keyed by full name."""
        return None

    def linear_tensors(self, lin: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The layer's tensors keyed by full name; `dtype` is `export.dtype` (for scales and
        biases where the format follows the model's dtype)."""
        raise NotImplementedError

    def quantization_config(self, base: QuantSpec, layers: list[LayerScheme], skipped: list[str],
                            options: dict[str, Any]) -> dict[str, Any]:
        """config.json's quantization_config. `base` is the plan's grid; `options` the method's
        settings (e.g. damp_percent) that the format may record."""
        raise NotImplementedError

    def side_files(self, qcfg: dict[str, Any]) -> dict[str, bytes]:
        return {}

    def weights_behind(self, name: str, shapes: dict[str, tuple[int, ...]], read: Callable[[str], torch.Tensor]) -> Optional[int]:
        """How many weights stored tensor `name` stands for: the full count for a packed
        weight, 0 for its scales/zeros/indices, None for a tensor the format does not own."""
        raise NotImplementedError

    def describe(self, qcfg: dict[str, Any]) -> list[str]:
        """`compress inspect`'s lines for the quantization (after the `quantization:` label)."""
        raise NotImplementedError

    def patcher(self, qcfg: dict[str, Any], dense_dtype: Optional[torch.dtype], block_prefix: str) -> BlockPatcher:
        """Swap a freshly built block's quantized linears for modules built from the stored
        tensors: `QuantLinear`, or with `dense_dtype` an `nn.Linear` of the dequantized weight
        (for a block's short life in evaluation, where it saves a dequantization per batch).
        `block_prefix` + index + local name is a layer's full name."""
        raise NotImplementedError


FORMATS: dict[str, Format] = {}


def register_format(cls: type[Format]) -> type[Format]:
    FORMATS[cls.name] = cls()
    return cls


def get_format(name: str) -> Format:
    _load_builtins()
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown export format '{name}'; valid: {', '.join(sorted(FORMATS))}") from None


def format_of_artifact(qcfg: dict[str, Any]) -> Format:
    """The format whose artifacts carry this quantization_config."""
    _load_builtins()
    for f in FORMATS.values():
        if qcfg.get("quant_method") == f.quant_method:
            return f
    known = ", ".join(sorted(f.quant_method for f in FORMATS.values()))
    raise ValueError(f"quant_method {qcfg.get('quant_method')!r} is not one compress reads ({known})")


def format_names() -> tuple[str, ...]:
    _load_builtins()
    return tuple(FORMATS)


def _load_builtins() -> None:
    from compress.formats import awq, compressed_tensors, gptq  # noqa: F401  (register themselves)
