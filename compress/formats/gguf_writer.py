"""Atomic, streamed writing of one GGUF file (``model.gguf``) in a model folder.

A GGUF file is header, key/values, tensor infos (name, shape, type, offset), then the tensor
data, each tensor aligned to ``general.alignment`` (32). The infos need every tensor's type
and size, which the block-streaming exporter knows only at the end; so, as `ArtifactWriter`
does for safetensors shards, tensor bytes are appended to a spill file in the ``.partial-``
folder as blocks arrive (already padded to the alignment, so their offsets are final), and
`finish` writes header, key/values and infos with gguf-py's `GGUFWriter`, then copies the spill
after them in chunks, fsyncs and renames the folder into place. The process holds one block.

Tensors arrive under Hugging Face names; floats are stored F32 when 1-D (norms, biases: llama.cpp
keeps them F32) and in the export dtype otherwise; a quantized linear arrives as its GGUF bytes
(``uint8 [out, row bytes]``) beside a ``<name>.ggml_type`` scalar naming its type.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch

from compress.formats.writer import ArtifactWriter, _names_folder, stream_tensor
from compress.models.checkpoint import all_finite

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
TYPE_SUFFIX = ".ggml_type"
_ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT
_COPY_CHUNK = 1 << 24


class GGUFArtifactWriter(ArtifactWriter):
    """`ArtifactWriter`'s folder protocol (partial sibling, owner record, manifest last, rename)
    around one GGUF file. `names(hf_name) -> (gguf_name, row order or None)`; `metadata(w)`
    adds the key/values to a `gguf.GGUFWriter` at `finish`; `shift(hf_name)` is added to a
    float tensor's values as it is stored (Gemma 3's norms: llama.cpp holds 1 + w)."""

    def __init__(
        self, final_dir: Union[str, Path], *, arch: str, names: Callable[[str, int], tuple[str, Optional[torch.Tensor]]],
        metadata: Callable[[Any], None], float_dtype: torch.dtype, overwrite: bool = False,
        quantize_float: Optional[Mapping[str, str]] = None, shift: Optional[Callable[[str], float]] = None,
    ) -> None:
        import gguf

        super().__init__(final_dir, overwrite=overwrite)
        self._gguf = gguf.GGUFWriter(None, arch)
        self._names_of = names
        self._metadata = metadata
        self._float_type = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[float_dtype]
        self._float_dtype = float_dtype
        self._offset = 0
        self._gguf_names: set[str] = set()
        # float tensors (the embedding, an untied lm_head) stored rounded to nearest on a GGUF
        # block grid, as llama-quantize stores token_embd/output; HF name -> grid name
        self._quantize_float = dict(quantize_float or {})
        self._shift = shift

    # -- content ---------------------------------------------------------------------------
    def add_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        types = {k[: -len(TYPE_SUFFIX)]: int(tensors.pop(k)) for k in list(tensors) if k.endswith(TYPE_SUFFIX)}
        for name, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            self._add(name, [t], tuple(t.shape), t.dtype, types.get(name))

    def add_tensor_chunks(self, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                          chunks: Iterable[torch.Tensor]) -> None:
        self._add(name, chunks, shape, dtype, None)

    @_names_folder
    def _add(self, name: str, chunks: Iterable[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
             ggml_type: Optional[int]) -> None:
        import gguf
        import numpy as np

        self._check_open()
        if name in self._names:
            raise ValueError(f"tensor '{name}' was already added")
        gname, order = self._names_of(name, shape[0] if shape else 1)
        if gname in self._gguf_names:
            raise ValueError(f"tensor '{name}': GGUF name '{gname}' is already taken")
        if ggml_type is None and name in self._quantize_float:
            grid = self._quantize_float[name]
            ggml_type = int(gguf.GGMLQuantizationType[grid])
            chunks = (_round_rows(c, grid, name) for c in chunks)
            shape, dtype = (shape[0], _row_bytes(grid, shape[1])), torch.uint8
        if ggml_type is not None:
            qtype = gguf.GGMLQuantizationType(ggml_type)
            if dtype != torch.uint8:
                raise ValueError(f"tensor '{name}': {qtype.name} bytes must be uint8, not {dtype}")
            store = torch.uint8
        else:
            if not dtype.is_floating_point:
                raise ValueError(f"tensor '{name}' has dtype {dtype}; GGUF export writes float or block tensors")
            offset = self._shift(name) if self._shift is not None else 0.0
            if offset:
                chunks = (c.detach().to(torch.float32) + offset for c in chunks)
            qtype = gguf.GGMLQuantizationType["F32" if len(shape) <= 1 else self._float_type]
            store = torch.float32 if len(shape) <= 1 else self._float_dtype
        if order is not None:  # a row permutation needs the whole tensor (q/k: one chunk)
            whole = torch.cat([c.detach().to("cpu") for c in chunks])
            chunks = [whole[order]]
        if self._spill is None:
            self._spill = open(self.tmp_dir / ".spill", "wb")
        start = self._spill.tell()
        try:
            written, pad = stream_tensor(self._spill, name, chunks, shape, store, _ALIGN)
        except BaseException:
            if self._spill.tell() != start:
                self.abort()  # the spill file may hold part of this tensor
            raise
        shape_np = list(shape) if shape else [1]
        if ggml_type is not None:
            self._gguf.add_tensor_info(gname, shape_np, np.dtype(np.uint8), written, raw_dtype=qtype)
        elif qtype.name == "BF16":  # numpy has no bf16: the shape is taken as given with raw_dtype
            self._gguf.add_tensor_info(gname, shape_np, np.dtype(np.float16), written, raw_dtype=qtype)
        else:
            self._gguf.add_tensor_info(gname, shape_np, np.dtype(np.float32 if store == torch.float32 else np.float16), written)
        self._offset += written + pad
        self._names.add(name)
        self._gguf_names.add(gname)
        self._total_bytes += written

    def _flush(self) -> None:  # the spill is one file, turned into the GGUF at finish
        return

    # -- completion ------------------------------------------------------------------------
    @_names_folder
    def finish(self, config_json: Mapping[str, Any], manifest: Mapping[str, Any]) -> Path:
        self._check_open()
        if not self._names:
            raise ValueError("no tensors were added; refusing to write an artifact without weights")
        self._metadata(self._gguf)
        assert self._spill is not None
        self._spill.close()
        self._spill = None
        spill = self.tmp_dir / ".spill"
        w = self._gguf
        w.write_header_to_file(self.tmp_dir / GGUF_FILE)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        out = w.fout[0]
        w.write_padding(out, out.tell())
        with open(spill, "rb") as data:
            shutil.copyfileobj(data, out, _COPY_CHUNK)
        out.flush()
        os.fsync(out.fileno())
        w.close()
        spill.unlink()
        self._seal(config_json, manifest)
        self._done = True
        log.info("wrote %s (%s, %d tensor bytes)", self.final_dir, GGUF_FILE, self._total_bytes)
        return self.final_dir


def _row_bytes(grid: str, cols: int) -> int:
    from compress.formats.gguf_kquants import row_bytes
    from compress.quantizers.kgrid import get_grid

    return row_bytes(get_grid(grid), cols)


def _round_rows(rows: torch.Tensor, grid: str, name: str) -> torch.Tensor:
    """Rows of a float tensor as bytes of `grid`, rounded to nearest (RTN on the grid)."""
    from compress.formats.gguf_kquants import encode
    from compress.quantizers.base import QuantSpec
    from compress.quantizers.rtn import round_to_nearest

    rows = rows.detach().to("cpu", torch.float32)
    if not all_finite(rows):
        raise ValueError(f"tensor '{name}' contains NaN or Inf; refusing to write it")
    return encode(round_to_nearest(rows, QuantSpec(bits=8).on_gguf_grid(grid)))
