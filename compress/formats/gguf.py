"""GGUF (``export.format: gguf``): one ``model.gguf`` that llama.cpp, Ollama, LM Studio and
transformers' GGUF loader read, with our codes on the grid of a simple GGUF block type.

``export.gguf_type`` names the file's type; each quantized linear is stored in the type whose
grid is exactly its own (`gguf_blocks.type_for`: Q8_0 = 8-bit symmetric, Q4_0 = 4-bit
symmetric, Q4_1 = 4-bit asymmetric, all with groups of 32 consecutive columns), so a per-layer
override to another of these grids becomes a tensor of that type, as llama.cpp's mixes do.
The token embedding and an unquantized lm_head (``output``) are rounded to nearest in the type
llama-quantize gives them under that ftype (`gguf_mix`: Q8_0 or Q6_K for a tied embedding or the
output; ``export.gguf_embedding: float`` keeps them in ``export.dtype``); skipped linears are
stored in ``export.dtype`` (F16, BF16 or F32), norms and biases in F32. Layout: `gguf_meta` (names, keys,
tokenizer), `gguf_writer` (the file). The folder also holds ``config.json`` (our reader's
entry: ``quantization_config.quant_method: gguf``) and the manifest.

Read back for evaluation through `GGUFCheckpoint`: every tensor under its Hugging Face name,
in Hugging Face row order, block tensors as their bytes, which the patcher decodes
(`gguf_blocks.decode`, bit-equal to gguf-py's dequantization).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from compress.formats import gguf_blocks as gb
from compress.formats import gguf_kquants as gk
from compress.formats.qweight import BlockQuantWeight
from compress.formats.gguf_writer import GGUF_FILE, TYPE_SUFFIX
from compress.formats.registry import BlockPatcher, Format, LayerScheme, QuantizedLinear, register_format
from compress.models.checkpoint import Checkpoint, CheckpointError
from compress.quantizers.base import QuantSpec
from compress.quantizers.kgrid import GRIDS


def _blocky(kind: str) -> bool:
    """A GGUF block type compress reads (simple types and kgrid's)."""
    return kind in gb.TYPES or kind in GRIDS


def _ggml_type(name: str) -> int:
    from gguf import GGMLQuantizationType

    return int(GGMLQuantizationType[name])


@register_format
class GGUFFormat(Format):
    name = "gguf"
    quant_method = "gguf"
    loaders = "llama.cpp, Ollama, LM Studio; transformers (gguf_file='model.gguf', dequantizing)"
    copies_side_files = False  # the tokenizer is inside the GGUF

    # ---- preflight ---------------------------------------------------------------------------
    def default_sym(self, export) -> bool:
        from compress.formats import gguf_mix as gx
        from compress.quantizers.kgrid import get_grid

        t = export.gguf_type
        return get_grid(gx.base_type(t)).sym if t in gx.K_TYPES else gb.TYPES[t].sym

    def check_config(self, cfg) -> Optional[str]:
        from compress.formats import gguf_mix as gx
        from compress.quantizers.kgrid import get_grid

        t = cfg.export.gguf_type
        if t not in gx.K_TYPES:
            return None
        g = get_grid(gx.base_type(t))
        implied = {"bits": g.bits, "group_size": g.sub, "sym": g.sym}
        pure = t in gx.PURE
        why = (f"export.gguf_type {t} implies bits {g.bits}, group_size {g.sub}, sym {str(g.sym).lower()}"
               if pure else f"export.gguf_type {t} is a mix: its types set bits, group_size and sym per tensor")
        sources = [("quantize", cfg.quantize, cfg.quantize.model_fields_set)]
        sources += [(f"candidates.{k}", c, {f for f in c.model_fields_set if getattr(c, f) is not None})
                    for k, c in enumerate(cfg.candidates)]
        for where, obj, explicit in sources:
            for key, want in implied.items():
                if key in explicit and (not pure or getattr(obj, key) != want):
                    return f"{where}.{key}: {why}; remove the key"
        for where, obj, explicit in sources:
            if "target_options" in explicit and obj.target_options is not None \
                    and "group_sizes" in obj.target_options.model_fields_set:
                return (f"{where}.target_options.group_sizes: under export.gguf_type {t} each option's GGUF "
                        "type sets its group size (target_options.bits 2..6, 8: Q2_K..Q6_K, Q8_0); remove the key")
        if cfg.sweep is not None:
            for key in implied:
                if getattr(cfg.sweep, key, None) is not None:
                    return f"sweep.{key}: {why}; sweep methods or their options instead"
        return None

    def check_run(self, export, plans) -> Optional[str]:
        from compress.formats import gguf_mix as gx

        if export.gguf_type in gx.K_TYPES:
            for p in plans:
                q = p.q
                which = f" (candidate '{p.name}')" if len(plans) > 1 else ""
                if q.method not in ("rtn", "gptq", "awq"):
                    return (f"quantize.method: {q.method} cannot round on GGUF {export.gguf_type}'s block grid; "
                            f"use rtn, gptq or awq{which}")
                if getattr(q, "clip", False):  # AWQ's clipping searches a uniform grid's range
                    return (f"quantize.clip: GGUF {export.gguf_type}'s block grid chooses its own ranges "
                            f"(kgrid's range search); remove clip{which}")
                for k, o in enumerate(q.overrides):
                    for key in ("bits", "group_size", "sym"):
                        if getattr(o, key) is not None:
                            return (f"quantize.overrides.{k}.{key}: export.gguf_type {export.gguf_type} sets the grid; "
                                    f"give the override a gguf_type instead{which}")
            return None
        t = gb.TYPES[export.gguf_type]
        for p in plans:
            q = p.q
            which = f" (candidate '{p.name}')" if len(plans) > 1 else ""
            for key, have, want in (("bits", q.bits, t.bits), ("group_size", q.group_size, gb.BLOCK),
                                    ("sym", q.sym, t.sym)):
                if have != want:
                    return f"quantize.{key}: gguf {t.name} needs {key} {str(want).lower()}, got {str(have).lower()}{which}"
            if q.spec(q.bits, q.group_size, q.sym).permutes_columns:
                return (f"quantize.static_groups: gguf blocks are 32 consecutive columns; act-order needs "
                        f"static_groups: true (codes then stay in natural order){which}")
        return None

    def check_model(self, config, root) -> Optional[str]:
        from compress.formats.gguf_meta import family_problem, tokenizer_problem

        problem = family_problem(config) or (tokenizer_problem(Path(root)) if root is not None else None)
        return f"export.format: gguf: {problem}" if problem else None

    def resolve_plan(self, plan, sm, config, export):
        """Under a k-quant `gguf_type`, every block linear gets an exact-name override with the
        GGUF type llama-quantize would give it (`gguf_mix`), or `skip` where it keeps F16."""
        import re

        from compress.formats import gguf_mix as gx
        from compress.quantizers.base import Override
        from compress.stages.quantize import Plan

        if export.gguf_type not in gx.K_TYPES:
            return plan
        extra = []
        for hf, t in gx.tensor_types(sm, config, export.gguf_type).items():
            if not hf.startswith(sm.block_prefix):
                continue  # the embedding / lm_head: the writer rounds them (`open_writer`)
            pattern = f"^{re.escape(hf[: -len('.weight')])}$"
            extra.append(Override(pattern=pattern, skip=True) if t == "F16" else Override(pattern=pattern, gguf_type=t))
        return Plan(plan.name, plan.q.model_copy(update={"overrides": [*plan.q.overrides, *extra]}))

    def check_head(self, spec: QuantSpec, export) -> Optional[str]:
        from compress.formats import gguf_mix as gx

        if export.gguf_type in gx.K_TYPES:
            return (f"export.gguf_type {export.gguf_type} already stores output / token_embd in the types "
                    "llama-quantize chooses; remove quantize.lm_head")
        if gb.type_for(spec.bits, spec.group_size, spec.sym) is None:
            return (f"the output tensor needs a simple GGUF type's grid (Q8_0: bits 8 sym; Q4_0: bits 4 sym; "
                    f"Q4_1: bits 4 asym; group_size 32), not bits {spec.bits} group_size {spec.group_size} "
                    f"sym {str(spec.sym).lower()}")
        return None

    def check(self, layer: str, spec: QuantSpec, shape: tuple[int, int], conv1d: bool) -> Optional[str]:
        if spec.gguf_grid is not None:
            from compress.quantizers.kgrid import get_grid

            g = get_grid(spec.gguf_grid)
            if shape[1] % g.block:
                return f"input size {shape[1]} is not a multiple of {g.name}'s block of {g.block}"
            return None
        if gb.type_for(spec.bits, spec.group_size, spec.sym) is None:
            return (f"no simple GGUF type has the grid bits={spec.bits} group_size={spec.group_size} "
                    f"sym={spec.sym} (Q8_0: 8 sym, Q4_0: 4 sym, Q4_1: 4 asym, all group_size 32)")
        if spec.permutes_columns:
            return "a permuted g_idx (act-order with dynamic groups); set quantize.static_groups: true"
        if shape[1] % gb.BLOCK:
            return f"input size {shape[1]} is not a multiple of the GGUF block size {gb.BLOCK}"
        return None

    # ---- writing -----------------------------------------------------------------------------
    def open_writer(self, out_dir, exporter):
        from compress import __version__
        from compress.formats import gguf_meta as gm
        from compress.formats import gguf_mix as gx
        from compress.formats.gguf_writer import GGUFArtifactWriter
        from compress.models.provenance import describe_source

        cfg, loaded, q = exporter.cfg, exporter.loaded, exporter.plan.q
        names = gm.Names(loaded.config)

        def metadata(w) -> None:
            gm.add_general(w, describe_source(loaded.root), q.method, cfg.export.gguf_type, __version__)
            gm.add_architecture(w, loaded.config)
            gm.add_tokenizer(w, loaded.root, loaded.config)

        outer: dict[str, str] = {}
        if cfg.export.gguf_embedding == "auto":  # token_embd / a float output in llama-quantize's type
            types = gx.tensor_types(exporter.sm, loaded.config, cfg.export.gguf_type, head_quantized=q.lm_head is not None)
            outer = {n: t for n, t in types.items() if not n.startswith(exporter.sm.block_prefix) and t != "F16"}
        return GGUFArtifactWriter(
            out_dir, arch=names.family.arch, names=lambda n, rows: (names.gguf(n), names.row_order(n, rows)),
            metadata=metadata, float_dtype=getattr(torch, cfg.export.dtype), overwrite=exporter.overwrite,
            quantize_float=outer, shift=names.shift,
        )

    def float_bytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        # 1-D tensors (norms, biases) are F32 (`GGUFArtifactWriter`)
        return super().float_bytes(shape, torch.float32 if len(shape) <= 1 else dtype)

    def rounded_outer(self, sm, export, head_quantized: bool) -> dict[str, tuple[int, QuantSpec]]:
        """token_embd (and a float output) in the type `open_writer` rounds them to under
        `gguf_embedding: auto`: rows of that type's blocks, and that GGUF grid (its `gguf_grid`
        names the type), on which the writer rounds them."""
        from compress.formats import gguf_mix as gx
        from compress.formats.gguf_writer import _row_bytes

        if export is None or export.gguf_embedding != "auto":
            return {}
        types = gx.tensor_types(sm, sm.model.config, export.gguf_type, head_quantized=head_quantized)
        state = dict(sm.model.state_dict())
        return {n: (int(state[n].shape[0]) * _row_bytes(t, int(state[n].shape[1])), QuantSpec(bits=8).on_gguf_grid(t))
                for n, t in types.items() if not n.startswith(sm.block_prefix) and t != "F16"}

    def target_bits(self, export) -> list[int]:
        from compress.formats import gguf_mix as gx

        return list(gx.TARGET_TYPES) if self.recipe(export) else super().target_bits(export)

    def recipe(self, export) -> bool:
        from compress.formats import gguf_mix as gx

        return export is not None and export.gguf_type in gx.K_TYPES

    def target_spec(self, spec: QuantSpec, shape: tuple[int, int], export) -> Optional[QuantSpec]:
        """Under a k-quant `gguf_type` an option's bits name a GGUF type (`gguf_mix.TARGET_TYPES`:
        2 -> Q2_K ... 6 -> Q6_K, 8 -> Q8_0), which takes llama-quantize's fallback for rows that
        are not a multiple of its block (Q4_K -> Q5_0 on rows of 576); None where that leaves
        F16 (the unquantized option stands for it). Simple types: the option as it is."""
        from compress.formats import gguf_mix as gx

        if not self.recipe(export):
            return spec
        t = gx.TARGET_TYPES.get(spec.bits)
        if t is None:
            return None
        t = gx.fallback(t, shape[1])
        return None if t == "F16" else spec.on_gguf_grid(t)

    def linear_bytes(self, shape: tuple[int, int], spec: QuantSpec, bias: bool, dtype: torch.dtype) -> int:
        # the type's blocks (a GGUF grid's, or the simple type's of the spec), the bias in F32
        if spec.gguf_grid is not None:
            from compress.quantizers.kgrid import get_grid

            row = gk.row_bytes(get_grid(spec.gguf_grid), shape[1])
            return shape[0] * row + (4 * shape[0] if bias else 0)
        row = gb.type_for(spec.bits, spec.group_size, spec.sym).row_bytes(shape[1])
        return shape[0] * row + (4 * shape[0] if bias else 0)

    def linear_tensors(self, lin: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if lin.activations is not None:
            raise ValueError(f"{lin.name}: GGUF export holds weight-only quantization")
        w = lin.weight
        if isinstance(w, BlockQuantWeight):
            out = {f"{lin.name}.weight": gk.encode(w),
                   f"{lin.name}.weight{TYPE_SUFFIX}": torch.tensor(_ggml_type(w.grid_name), dtype=torch.int32)}
            if lin.bias is not None:
                out[f"{lin.name}.bias"] = lin.bias.detach().to(torch.float32)
            return out
        t = gb.type_for(w.bits, w.group_size, w.sym)
        if t is None:
            raise ValueError(f"{lin.name}: no GGUF type for bits={w.bits} group_size={w.group_size} sym={w.sym}")
        out = {f"{lin.name}.weight": gb.encode(w, t, lin.name),
               f"{lin.name}.weight{TYPE_SUFFIX}": torch.tensor(_ggml_type(t.name), dtype=torch.int32)}
        if lin.bias is not None:
            out[f"{lin.name}.bias"] = lin.bias.detach().to(torch.float32)
        return out

    def quantization_config(self, base: QuantSpec, layers: list[LayerScheme], skipped: list[str],
                            options: dict[str, Any]) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for s in layers:
            t = s.gguf_grid or gb.type_for(s.bits, s.group_size, s.sym).name
            counts[t] = counts.get(t, 0) + 1
        base_type = gb.type_for(base.bits, base.group_size, base.sym)
        if any(s.gguf_grid for s in layers):
            base_type = None  # k-quant runs: `general.file_type` in the file names the mix
        return {"quant_method": self.quant_method, "gguf_file": GGUF_FILE,
                "gguf_type": base_type.name if base_type else None,
                "tensor_types": dict(sorted(counts.items())), "unquantized": sorted(skipped),
                "method": (options.get("meta") or {}).get("method")}

    def how_to_load(self, path) -> list[str]:
        import json

        p, f = json.dumps(str(path)), json.dumps(GGUF_FILE)
        return [f"llama-cli -m {path / GGUF_FILE}        # llama.cpp (or: ollama, LM Studio)",
                "from transformers import AutoModelForCausalLM, AutoTokenizer  # dequantizes to float",
                f"model = AutoModelForCausalLM.from_pretrained({p}, gguf_file={f})",
                f"tokenizer = AutoTokenizer.from_pretrained({p}, gguf_file={f})"]

    # ---- reading -----------------------------------------------------------------------------
    def open_checkpoint(self, path, config) -> "GGUFCheckpoint":
        return GGUFCheckpoint.open(Path(path) / GGUF_FILE, config)

    def weights_behind(self, name, shapes, read) -> Optional[int]:
        return None  # a GGUF folder has no safetensors: `tensor_summary` reads the GGUF header

    def tensor_summary(self, path):
        from gguf import GGUFReader

        f = Path(path) / GGUF_FILE
        try:
            reader = GGUFReader(str(f))
        except Exception as e:
            raise CheckpointError(f"{f}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
        return sum(int(t.n_elements) for t in reader.tensors), [f]

    def describe(self, qcfg: dict[str, Any]) -> list[str]:
        types = ", ".join(f"{k} x{v}" for k, v in (qcfg.get("tensor_types") or {}).items())
        return [f"quant_method=gguf, file={qcfg.get('gguf_file')}, gguf_type={qcfg.get('gguf_type')}",
                f"quantized linears: {types or 'none'}; method {qcfg.get('method')}"]

    def patcher(self, qcfg: dict[str, Any], dense_dtype: Optional[torch.dtype], block_prefix: str) -> BlockPatcher:
        # Q4_1's fp16 minimum is no integer zero point, so a GGUF layer is not a `QuantizedWeight`:
        # every layer is decoded to a plain Linear (in float32 when no dtype is asked for).
        from gguf import GGMLQuantizationType

        by_value = {_ggml_type(n): t for n, t in gb.TYPES.items()}
        by_value.update({_ggml_type(n): n for n in GRIDS if n not in gb.TYPES})
        dtype = dense_dtype or torch.float32

        def patch(block: torch.nn.Module, i: int, tensors: dict[str, torch.Tensor]) -> list[str]:
            names = sorted(k[: -len(".weight" + TYPE_SUFFIX)] for k in tensors if k.endswith(TYPE_SUFFIX))
            for n in names:
                code = int(tensors.pop(f"{n}.weight{TYPE_SUFFIX}"))
                if code not in by_value:
                    raise CheckpointError(f"{block_prefix}{i}.{n}: GGUF type {GGMLQuantizationType(code).name} "
                                          "is not one compress reads")
                raw = tensors.pop(f"{n}.weight")
                bias = tensors.pop(f"{n}.bias", None)
                t = by_value[code]
                w = gk.decode(raw, t).dequantize(dtype) if isinstance(t, str) else gb.decode(raw, t, dtype)
                layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=dtype, device="meta")
                layer.weight = torch.nn.Parameter(w, requires_grad=False)
                if bias is not None:
                    layer.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=False)
                block.set_submodule(n, layer)
            return names

        return patch


class GGUFCheckpoint(Checkpoint):
    """A GGUF file's tensors under Hugging Face names and row order (`Checkpoint`'s interface):
    float tensors as tensors, block tensors as their ``uint8`` bytes beside a ``.ggml_type``
    scalar. Data is read from the file's memory map a tensor (or a slice of rows) at a time."""

    @classmethod
    def open(cls, path: Path, config) -> "GGUFCheckpoint":
        from gguf import GGUFReader
        from transformers import AutoModelForCausalLM

        from compress.formats.gguf_meta import Names
        from compress.models.weights import _strip_quant

        if not path.is_file():
            raise CheckpointError(f"{path}: GGUF file missing")
        try:
            reader = GGUFReader(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
        names = Names(config)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(_strip_quant(config))
        by_gguf = {t.name: t for t in reader.tensors}
        ck = cls(path.parent, {})
        ck._tensors, ck._orders, ck._shifts = {}, {}, {}
        for hf, like in skeleton.state_dict().items():
            try:
                g = names.gguf(hf)
            except ValueError:
                continue
            t = by_gguf.get(g)
            if t is None:
                continue
            ck._tensors[hf] = t
            ck._orders[hf] = names.row_order(hf, like.shape[0]) if like.dim() else None
            ck._shifts[hf] = names.shift(hf)
            ck.index[hf] = path
            if _blocky(t.tensor_type.name) and g.startswith("blk."):
                ck.index[hf + TYPE_SUFFIX] = path  # a block linear: the patcher decodes its bytes
        ck._reader = reader
        return ck

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.index.values()))

    def tensor_info(self) -> dict[str, tuple[tuple[int, ...], str]]:
        out = {n: (tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
               for n, t in self._tensors.items() if t.tensor_type.name in ("F32", "F16", "BF16")}
        out.update({n: (tuple(int(d) for d in reversed(t.shape.tolist())), "F32") for n, t in self._tensors.items()
                    if _blocky(t.tensor_type.name) and not t.name.startswith("blk.")})  # decoded on read
        return out

    def _rows(self, name: str, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        import numpy as np

        t = self._tensors[name]
        kind = t.tensor_type.name
        data = np.asarray(t.data)
        if kind == "BF16":
            rows = data.reshape(int(t.shape[-1]) if len(t.shape) > 1 else 1, -1)
            out = torch.from_numpy(np.array(rows[start:stop])).view(torch.bfloat16)
        elif kind in ("F32", "F16"):
            out = torch.from_numpy(np.array(data[start:stop] if data.ndim > 1 else data))
        elif _blocky(kind):
            out = torch.from_numpy(np.array(data.reshape(data.shape[0], -1)[start:stop]))
            if not t.name.startswith("blk."):  # a quantized embedding / lm_head: read as float
                out = gk.decode(out, kind).dequantize(torch.float32) if kind in GRIDS else gb.decode(out, gb.TYPES[kind])
        else:
            raise CheckpointError(f"{self.root}: tensor '{name}' has GGUF type {kind}, which compress does not read")
        if data.ndim == 1 or (kind == "BF16" and len(t.shape) == 1):
            out = out.reshape(-1)
        if self._shifts[name]:  # back to the Hugging Face convention (Gemma 3's norms: w, not 1 + w)
            out = out - self._shifts[name]
        order = self._orders[name]
        if order is not None and start is None:
            out = out[torch.argsort(order)]
        return out

    def load(self, names, device="cpu") -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            if n not in self.index:
                raise CheckpointError(f"{self.root}: tensor '{n}' is missing from the GGUF file")
            if n.endswith(TYPE_SUFFIX):
                out[n] = torch.tensor(int(self._tensors[n[: -len(TYPE_SUFFIX)]].tensor_type), dtype=torch.int32)
            else:
                out[n] = self._rows(n).to(device)
        return out

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self._tensors:
            raise CheckpointError(f"{self.root}: tensor '{name}' is missing from the GGUF file")
        if self._orders[name] is not None:
            return self._rows(name)[start:stop]
        return self._rows(name, start, stop)
