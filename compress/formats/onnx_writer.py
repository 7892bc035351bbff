"""Atomic, streamed writing of an ONNX decoder folder (``model.onnx`` + ``model.onnx.data``).

Tensors arrive block by block under Hugging Face names (a quantized linear as its MatMulNBits
tensors, `nbits_tensors`) and their bytes are appended to ``model.onnx.data`` at once, so
the process holds one block; only their names, shapes and offsets are kept. A block's linears
of one input (`onnx_graph.FUSED`) are stacked into one op's tensors on the way
(`matmulnbits.concat`), under the fused name (``self_attn.qkv_proj``, ``mlp.gate_up_proj``).
`finish` adds the rotary tables, builds the graph (`onnx_graph.DecoderGraph`) whose
initializers point into the data file (ONNX external data: location, offset, length), writes ``model.onnx``,
``genai_config.json``, and seals the folder as every writer does (`ArtifactWriter._seal`).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from compress.formats.matmulnbits import NBitsTensors, concat
from compress.formats.onnx_graph import (COS, FUSED, NBITS, SIN, DecoderGraph, NBitsLayer, genai_config,
                                         rotary_tables)
from compress.formats.writer import ArtifactWriter, _names_folder, stream_tensor

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
_ALIGN = 64
_TAGS = ("K", "bits", "block_size")  # 0-dim tags of a MatMulNBits layer, not stored


def nbits_tensors(name: str, t: NBitsTensors, bias: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Linear `name`'s tensors as the writer takes them: ``<name>.MatMulNBits.{B,scales,...}``."""
    p = f"{name}{NBITS}"
    out = {f"{p}.B": t.B, f"{p}.scales": t.scales}
    if t.zero_points is not None:
        out[f"{p}.zero_points"] = t.zero_points
    if t.perm is not None:
        out[f"{p}.perm"] = t.perm
    # 0-dim tags: the op's attributes, read by the writer, never stored
    out.update({f"{p}.{k}": torch.tensor(getattr(t, k)) for k in _TAGS})
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().to(torch.float32)
    return out


def _take_nbits(tensors: dict[str, torch.Tensor], name: str) -> tuple[NBitsTensors, Optional[torch.Tensor]]:
    """Inverse of `nbits_tensors` (removing them from `tensors`)."""
    p = f"{name}{NBITS}"
    B = tensors.pop(f"{p}.B")
    t = NBitsTensors(B, tensors.pop(f"{p}.scales"), tensors.pop(f"{p}.zero_points", None),
                     tensors.pop(f"{p}.perm", None), int(tensors.pop(f"{p}.K")), B.shape[0],
                     int(tensors.pop(f"{p}.bits")), int(tensors.pop(f"{p}.block_size")))
    return t, tensors.pop(f"{name}.bias", None)


def fuse_linears(tensors: Mapping[str, torch.Tensor],
                 fused: Mapping[str, tuple[str, ...]] = FUSED) -> dict[str, torch.Tensor]:
    """`tensors` with each group of `fused` linears (all quantized, stackable) as one linear."""
    out = dict(tensors)
    for name, parts in fused.items():
        first = f"{parts[0]}{NBITS}.B"
        for key in [k for k in tensors if k.endswith("." + first)]:
            prefix = key[: -len(first)]
            if not all(f"{prefix}{n}{NBITS}.B" in out for n in parts):
                continue  # a part left in float
            taken = [_take_nbits(out, prefix + n) for n in parts]
            t = concat([x for x, _ in taken])
            if t is None:
                log.info("%s%s: layouts differ (act-order or grid), kept as separate MatMulNBits", prefix, name)
                for n, (x, b) in zip(parts, taken):
                    out.update(nbits_tensors(prefix + n, x, b))
                continue
            bias = None
            if any(b is not None for _, b in taken):
                bias = torch.cat([b if b is not None else torch.zeros(x.N) for x, b in taken])
            out.update(nbits_tensors(prefix + name, t, bias))
    return out


def _onnx_type(dtype: torch.dtype) -> int:
    from onnx import TensorProto

    return {torch.float32: TensorProto.FLOAT, torch.uint8: TensorProto.UINT8, torch.int64: TensorProto.INT64,
            torch.int32: TensorProto.INT32}[dtype]


class ONNXArtifactWriter(ArtifactWriter):
    """`ArtifactWriter`'s folder protocol around one ONNX decoder. `config`: the model's
    transformers config; `root`: its source folder (generation defaults for genai)."""

    fused: Mapping[str, tuple[str, ...]] = FUSED  # linears written as one op when they stack

    def __init__(self, final_dir: Union[str, Path], *, config, blocks_prefix: str, root: Any = None,
                 accuracy_level: int = 4, overwrite: bool = False) -> None:
        super().__init__(final_dir, overwrite=overwrite)
        self.config = config
        self.blocks_prefix = blocks_prefix
        self.root = root
        self.accuracy_level = accuracy_level
        self._data = open(self.tmp_dir / DATA_FILE, "wb")
        self._offset = 0
        self._inits: dict[str, tuple[int, tuple[int, ...], int, int]] = {}  # name -> type, shape, offset, length
        self._nbits: dict[str, dict[str, int]] = {}

    def abort(self) -> None:
        if not self._data.closed:
            self._data.close()
        super().abort()

    # -- content ---------------------------------------------------------------------------
    def add_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, t in fuse_linears(tensors, self.fused).items():
            t = t.detach().to("cpu")
            tag = name.rsplit(".", 1)
            if t.dim() == 0 and tag[0].endswith(NBITS) and tag[1] in _TAGS:
                self._nbits.setdefault(tag[0][: -len(NBITS)], {})[tag[1]] = int(t)
                continue
            if (t.is_floating_point() and t.dim() == 2 and name.endswith(".weight")
                    and name.startswith(self.blocks_prefix + ".")):
                t = t.t()  # a linear left in float: MatMul takes [in, out]
            t = t.contiguous()
            self._add(name, [t], tuple(t.shape), t.dtype)

    def add_tensor_chunks(self, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                          chunks: Iterable[torch.Tensor]) -> None:
        self._add(name, chunks, shape, dtype)

    @_names_folder
    def _add(self, name: str, chunks: Iterable[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._check_open()
        if name in self._inits:
            raise ValueError(f"tensor '{name}' was already added")
        store = torch.float32 if dtype.is_floating_point else dtype
        _onnx_type(store)  # refuses a type the graph does not take
        start = self._data.tell()
        try:
            written, pad = stream_tensor(self._data, name, chunks, shape, store, _ALIGN)
        except BaseException:
            if self._data.tell() != start:
                self.abort()  # the data file may hold part of this tensor
            raise
        self._inits[name] = (_onnx_type(store), tuple(shape), self._offset, written)
        self._offset += written + pad
        self._names.add(name)
        self._total_bytes += written

    def _flush(self) -> None:  # the data file is written as tensors come
        return

    # -- completion ------------------------------------------------------------------------
    def _initializers(self) -> list[Any]:
        from onnx import TensorProto

        out = []
        for name, (dt, shape, offset, length) in self._inits.items():
            t = TensorProto(name=name, data_type=dt, dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(length))):
                e = t.external_data.add()
                e.key, e.value = k, v
            out.append(t)
        return out

    def _generation(self) -> dict[str, Any]:
        p = Path(self.root) / "generation_config.json" if self.root else None
        return json.loads(p.read_text()) if p is not None and p.is_file() else {}

    @_names_folder
    def finish(self, config_json: Mapping[str, Any], manifest: Mapping[str, Any]) -> Path:
        from onnx import helper

        self._check_open()
        if not self._inits:
            raise ValueError("no tensors were added; refusing to write an artifact without weights")
        c = self.config
        cos, sin = rotary_tables(c, int(c.max_position_embeddings))
        self._add(COS, [cos], tuple(cos.shape), torch.float32)
        self._add(SIN, [sin], tuple(sin.shape), torch.float32)
        self._data.flush()
        os.fsync(self._data.fileno())
        self._data.close()
        nbits = {}
        for name, tags in self._nbits.items():
            B = self._inits[f"{name}{NBITS}.B"][1]
            nbits[name] = NBitsLayer(K=tags["K"], N=B[0], bits=tags["bits"], block_size=tags["block_size"])
        embed = "model.embed_tokens.weight"
        head = "lm_head.weight" if "lm_head.weight" in self._inits else embed
        head = "lm_head" if "lm_head" in nbits else head  # quantized: a MatMulNBits of its own
        if embed not in self._inits:  # a tied table stored once, as the quantized head
            if head != "lm_head":
                raise ValueError(f"no '{embed}' was added, and no quantized lm_head holds the table")
            embed = None
        g = DecoderGraph(c, nbits, set(self._inits), self.accuracy_level)
        inputs, outputs = g.build(embed, head, self.blocks_prefix, "model.norm.weight")
        graph = helper.make_graph(g.nodes, "compress-decoder", inputs, outputs, self._initializers())
        model = helper.make_model(graph, producer_name="compress", opset_imports=[
            helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        (self.tmp_dir / ONNX_FILE).write_bytes(model.SerializeToString())
        gen = genai_config(c, self._generation(), ONNX_FILE)
        (self.tmp_dir / GENAI_CONFIG).write_text(json.dumps(gen, indent=4) + "\n")
        self._seal(dict(config_json), dict(manifest))
        self._done = True
        log.info("wrote %s (%s, %d tensor bytes)", self.final_dir, ONNX_FILE, self._total_bytes)
        return self.final_dir
