"""On-disk formats, chosen by `export.format`: one writer/reader per format, one registry.

A format receives each quantized linear as a `QuantizedLinear` (codes, scales, zeros, the
spec used, an optional activation scheme) and lays it out; it derives the per-layer metadata
of its `quantization_config` from the layers it was given; it says at preflight, before any
quantization, which layer schemes it cannot hold; and it reads its own artifacts back for
evaluation (a block patcher that swaps in modules holding the stored codes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Union

import torch

from compress.formats.qweight import BlockQuantWeight, QuantizedWeight
from compress.quantizers.base import ActivationScheme, QuantSpec  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class QuantizedLinear:
    """One layer as a writer receives it."""

    name: str  # full module name, e.g. model.layers.0.self_attn.q_proj
    weight: Union[QuantizedWeight, BlockQuantWeight]
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
    gguf_grid: Optional[str] = None  # a GGUF block grid (k-quants, Q5_0, ...): `BlockQuantWeight`
    lookup: bool = False  # an embedding table (`quantize.embedding`), not a linear

    @classmethod
    def of(cls, lin: QuantizedLinear, lookup: bool = False) -> "LayerScheme":
        w = lin.weight
        return cls(lin.name, w.bits, w.group_size, w.sym, w.desc_act, lin.activations,
                   getattr(w, "grid_name", None), lookup)

    @property
    def key(self) -> tuple:
        return (self.bits, self.group_size, self.sym, self.activations, self.gguf_grid, self.lookup)


# (block, block index, the block's tensors by local name) -> names of the modules it replaced.
# The index is None for the model's outer modules (a quantized lm_head), named from the root.
BlockPatcher = Callable[[torch.nn.Module, Optional[int], dict[str, torch.Tensor]], list[str]]


def full_name(block_prefix: str, i: Optional[int], local: str) -> str:
    """A patched layer's full module name: `local` inside block `i`, or from the root when `i` is None."""
    return local if i is None else f"{block_prefix}{i}.{local}"


class Format:
    """What every on-disk format provides. Subclasses register with `@register_format`."""

    name: ClassVar[str]
    quant_method: ClassVar[str]  # config.json quantization_config.quant_method of its artifacts
    loaders: ClassVar[str]  # what loads it, for the end-of-run message and the card
    copies_side_files: ClassVar[bool] = True  # the source's tokenizer files go beside the weights

    def default_sym(self, export: Any) -> bool:
        """`quantize.sym` when the config leaves it out: asymmetric, unless the format holds
        only symmetric grids."""
        return False

    def check_run(self, export: Any, plans: list[Any]) -> Optional[str]:
        """Why the run's `export` settings and candidates (`Plan`s) cannot be written, naming the
        config key (None when they can); checked at preflight, before the model is read."""
        return None

    def check_config(self, cfg: Any) -> Optional[str]:
        """Why the run config (`RunConfig`, with which keys were set explicitly) conflicts with
        this format, naming the key (None when it does not); checked at preflight."""
        return None

    def resolve_plan(self, plan: Any, sm: Any, config: Any, export: Any) -> Any:
        """The candidate's `Plan` once the model is known (the streamed model's blocks and
        shapes, its transformers config): a format that chooses grids per tensor (GGUF's mixes)
        adds exact-name overrides here. Default: unchanged."""
        return plan

    def check_model(self, config: Any, root: Any) -> Optional[str]:
        """Why this model (transformers config, source folder) cannot be written (None when it can)."""
        return None

    def open_writer(self, out_dir: Any, exporter: Any) -> Any:
        """The writer the exporter streams tensors into (`formats.writer.ArtifactWriter`'s interface)."""
        from compress.formats.writer import ArtifactWriter

        cfg = exporter.cfg.export
        return ArtifactWriter(out_dir, overwrite=exporter.overwrite, max_shard_bytes=cfg.max_shard_bytes)

    def how_to_load(self, path: Any) -> list[str]:
        """The lines that load an artifact of this format, for the end of a run."""
        import json

        p = json.dumps(str(path))
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                f"model, tokenizer = AutoModelForCausalLM.from_pretrained({p}), AutoTokenizer.from_pretrained({p})"]

    def open_checkpoint(self, path: Any, config: Any) -> Any:
        """The artifact's tensors as a `models.checkpoint.Checkpoint` under Hugging Face names."""
        from compress.models.checkpoint import open_checkpoint

        return open_checkpoint(path)

    def check(self, layer: str, spec: QuantSpec, shape: tuple[int, int], conv1d: bool) -> Optional[str]:
        """Why this format cannot hold `spec` for `layer` (None when it can)."""
        raise NotImplementedError

    def check_head(self, spec: QuantSpec, export: Any) -> Optional[str]:
        """Why this format cannot store the lm_head quantized on `spec` (`quantize.lm_head`;
        None when it can); checked at preflight, before the model is read. Shapes are then
        checked by `check` like any layer. Default: the format keeps the head in float."""
        return f"{self.name} artifacts keep the lm_head in export.dtype; remove quantize.lm_head"

    def check_embedding(self, spec: QuantSpec, export: Any) -> Optional[str]:
        """Why this format cannot store the input embedding quantized on `spec`
        (`quantize.embedding`; None when it can), at preflight. Default: it keeps it in float."""
        return f"{self.name} artifacts keep the embedding in export.dtype; remove quantize.embedding"

    def embedding_tensors(self, name: str, weight: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A quantized embedding's tensors (`name` the module's full name) for `weight`, which may
        be a slice of the table's rows: every tensor is laid out by row along dim 0, so slices
        concatenate. Only formats whose `check_embedding` accepts a spec are asked."""
        raise NotImplementedError

    def embedding_bytes(self, shape: tuple[int, int], spec: QuantSpec, dtype: torch.dtype) -> int:
        """Bytes of `embedding_tensors` for a [vocab, hidden] table, without quantizing."""
        raise NotImplementedError

    def read_embedding(self, qcfg: dict[str, Any], name: str, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        """Inverse of `embedding_tensors` (`tensors` keyed by local suffix: `weight`, `weight_scale`)."""
        raise NotImplementedError

    def shares_tied_head(self, export: Any = None) -> bool:
        """Whether a tied model's table is stored once as the quantized head (`quantize.lm_head`),
        the embedding gathering its rows from the head's codes (ONNX GatherBlockQuantized); else
        the head is untied. `export`: the run's export settings (None: the format's default)."""
        return False

    def float_bytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes of a tensor of `shape` the format writes in float (a norm, a bias, a linear or
        table left unquantized), for the bytes model of a byte budget: `dtype` (`export.dtype`)."""
        return math.prod(shape) * dtype.itemsize

    def rounded_outer(self, sm: Any, export: Any, head_quantized: bool) -> dict[str, tuple[int, QuantSpec]]:
        """The float tensors outside the blocks that the format itself stores rounded (GGUF's
        token_embd / output in llama-quantize's types): Hugging Face name -> (its bytes, the
        `QuantSpec` it is rounded on), for the bytes model, the predicted loss and the
        allocation's record; `head_quantized`: the head is written quantized, as its own
        tensor."""
        return {}

    def target_bits(self, export: Any) -> list[int]:
        """`quantize.target_options.bits` when the config leaves it out."""
        return [2, 3, 4, 8]

    def target_spec(self, spec: QuantSpec, shape: tuple[int, int], export: Any) -> Optional[QuantSpec]:
        """The grid a target option (`bits` x `group_sizes` of `quantize.target_options`) takes
        for a linear of `shape` [out, in] in this format, or None where it has none. Default:
        the option as it is (`check` then says whether the format holds it), for the bits
        `quantize.bits` takes (5 and 6 name GGUF k-quants only)."""
        return spec if spec.bits in (2, 3, 4, 8) else None

    def recipe(self, export: Any) -> bool:
        """Whether the plan's per-layer options are the format's own recipe (llama-quantize's
        k-quant mixes), which a byte budget's allocation must measure better than to replace."""
        return False

    def graph_bytes(self, config: Any) -> int:
        """Bytes of tensors the format adds beside the model's own (ONNX's rotary tables), for
        the bytes model of a byte budget."""
        return 0

    def check_plan(self, specs: dict[str, QuantSpec]) -> Optional[str]:
        """Why this format cannot hold the plan's layers together (None when it can): for a
        format with one grid per model, layers whose overrides differ. Keyed by full name."""
        return None

    def linear_tensors(self, lin: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The layer's tensors keyed by full name; `dtype` is `export.dtype` (for scales and
        biases where the format follows the model's dtype)."""
        raise NotImplementedError

    def linear_bytes(self, shape: tuple[int, int], spec: QuantSpec, bias: bool, dtype: torch.dtype) -> int:
        """Bytes of the tensors `linear_tensors` writes for a layer of `shape` [out, in] under
        `spec` (codes, scales, zeros, g_idx, and the bias when `bias`), without quantizing
        anything: what the mixed-precision budget counts. This default writes a dummy layer;
        a format overrides it with its layout's arithmetic (tests compare the two)."""
        out_f, in_f = shape
        n_g = spec.groups_for(in_f)
        gs = in_f if spec.group_size == -1 else spec.group_size
        zero = 1 << (spec.bits - 1) if spec.sym else 1
        qw = QuantizedWeight(
            codes=torch.zeros(out_f, in_f, dtype=torch.uint8), scales=torch.ones(out_f, n_g),
            zeros=torch.full((out_f, n_g), zero, dtype=torch.uint8),
            g_idx=torch.arange(in_f, dtype=torch.int32) // gs,
            bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
        )
        lin = QuantizedLinear("x", qw, spec.grid, torch.zeros(out_f) if bias else None)
        return sum(t.numel() * t.element_size() for t in self.linear_tensors(lin, dtype).values())

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

    def tensor_summary(self, path: Any) -> Optional[tuple[int, list[Any]]]:
        """(weights stored, weight files) of an artifact folder, for a format whose files are not
        safetensors; None: `compress inspect` reads the safetensors headers with `weights_behind`."""
        return None

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
    from compress.formats import awq, compressed_tensors, gguf, gptq, onnx_format  # noqa: F401  (register themselves)
