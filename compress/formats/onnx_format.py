"""ONNX (``export.format: onnx``): a decoder with KV cache that ONNX Runtime runs and
onnxruntime-genai generates with, every quantized linear a ``com.microsoft::MatMulNBits``
filled from our own codes, scales and zeros (`matmulnbits.to_matmulnbits`; nothing is
quantized again).

The folder: ``model.onnx`` (graph, `onnx_graph`), ``model.onnx.data`` (external data, written
as blocks stream in, `onnx_writer`), ``genai_config.json``, the tokenizer files, our
``config.json`` (``quantization_config.quant_method: onnx``) and the manifest. The graph is
float32; unquantized tensors (embedding, norms, a skipped linear, an untied head) are float32.
A tied model with a quantized head (`quantize.lm_head`) stores its table once, as the head's
MatMulNBits codes, which the embedding reads with ``GatherBlockQuantized`` (the layout of the
builder's ``shared_embeddings``): a table of 8 or 4 bits instead of float32 twice over.

Why the graph is built here block by block rather than with onnxruntime-genai's model builder
or ``torch.onnx``: the builder reads a float (or its own quantized) checkpoint and quantizes
it itself, and ``torch.onnx`` traces a whole in-memory model; both hold the full model, and
neither writes GPTQ act-order or our zero points as they are. Writing each block's tensors as
they leave the quantizer keeps export at one block of memory, like the other formats.

Evaluated in ONNX Runtime (`compress.evaluate.onnx_runtime`), not read back into torch.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from compress.formats.matmulnbits import BITS, block_size_for, nbytes, to_matmulnbits
from compress.formats.onnx_graph import family_problem
from compress.formats.onnx_writer import DATA_FILE, GENAI_CONFIG, ONNX_FILE, nbits_tensors
from compress.formats.registry import BlockPatcher, Format, LayerScheme, QuantizedLinear, register_format
from compress.quantizers.base import QuantSpec

log = logging.getLogger(__name__)


def is_onnx_artifact(path: Any) -> bool:
    import json

    p = Path(path) / "config.json"
    try:
        return json.loads(p.read_text()).get("quantization_config", {}).get("quant_method") == ONNXFormat.quant_method
    except (OSError, ValueError):
        return False


@register_format
class ONNXFormat(Format):
    name = "onnx"
    quant_method = "onnx"
    loaders = "onnxruntime (com.microsoft MatMulNBits, GroupQueryAttention), onnxruntime-genai"

    # ---- preflight ---------------------------------------------------------------------------
    def check_run(self, export, plans) -> Optional[str]:
        if export.dtype != "float32":
            return f"export.dtype: onnx export writes a float32 graph; set export.dtype: float32 (got {export.dtype})"
        for p in plans:
            q = p.q
            which = f" (candidate '{p.name}')" if len(plans) > 1 else ""
            if q.bits not in BITS:
                return f"quantize.bits: MatMulNBits holds bits {' or '.join(map(str, BITS))}, got {q.bits}{which}"
            if block_size_for(q.group_size, 1) is None:
                return (f"quantize.group_size: MatMulNBits blocks are a power of two >= 16 (or -1, per channel), "
                        f"got {q.group_size}{which}")
            ref = q.target_options.reference_bits if q.target is not None else None
            if ref is not None and q.target_options.predictor == "block_kl" and ref not in BITS:
                return (f"quantize.target_options.reference_bits: MatMulNBits holds bits "
                        f"{' or '.join(map(str, BITS))}, got {ref}{which}")
            if q.bits == 8 and export.onnx_accuracy_level < 4:
                # ORT's CPU library has 8-bit MatMulNBits kernels for int8 activations only; below
                # level 4 the op dequantizes its whole weight on every call
                log.warning("export.onnx_accuracy_level: %d with bits 8%s runs some 20x slower than float32 "
                            "in ONNX Runtime on a CPU; 4 uses its int8 kernel", export.onnx_accuracy_level, which)
        return None

    def check_model(self, config, root) -> Optional[str]:
        problem = family_problem(config)
        return f"export.format: onnx: {problem}" if problem else None

    def check_head(self, spec: QuantSpec, export) -> Optional[str]:
        if spec.bits not in BITS:
            return f"MatMulNBits holds bits {' or '.join(map(str, BITS))}, not {spec.bits}"
        if block_size_for(spec.group_size, 1) is None:
            return f"group_size {spec.group_size} is not a power of two >= 16 (MatMulNBits block_size)"
        return None

    def check(self, layer: str, spec: QuantSpec, shape: tuple[int, int], conv1d: bool) -> Optional[str]:
        if spec.activations is not None:
            return "MatMulNBits holds weight-only quantization, not quantized activations (W8A8)"
        if spec.bits not in BITS:
            return f"MatMulNBits holds bits {' or '.join(map(str, BITS))}, not {spec.bits}"
        if block_size_for(spec.group_size, shape[1]) is None:
            return f"group_size {spec.group_size} is not a power of two >= 16 (MatMulNBits block_size)"
        return None

    # ---- writing -----------------------------------------------------------------------------
    def open_writer(self, out_dir, exporter):
        from compress.formats.onnx_writer import ONNXArtifactWriter

        loaded = exporter.loaded
        return ONNXArtifactWriter(out_dir, config=loaded.config, blocks_prefix=exporter.sm.block_prefix.rstrip("."),
                                  root=loaded.root, accuracy_level=exporter.cfg.export.onnx_accuracy_level,
                                  overwrite=exporter.overwrite)

    def linear_tensors(self, lin: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if lin.activations is not None:
            raise ValueError(f"{lin.name}: ONNX MatMulNBits export holds weight-only quantization")
        return nbits_tensors(lin.name, to_matmulnbits(lin.weight), lin.bias)

    def shares_tied_head(self, export=None) -> bool:
        return export is None or export.onnx_shared_embedding  # the builder's shared_embeddings

    def graph_bytes(self, config) -> int:
        from compress.formats.onnx_graph import head_dim

        return 2 * 4 * int(config.max_position_embeddings) * (head_dim(config) // 2)  # cos, sin: float32

    def linear_bytes(self, shape, spec, bias, dtype) -> int:
        return nbytes(shape[0], shape[1], spec.bits, spec.group_size, spec.sym) + (4 * shape[0] if bias else 0)

    def quantization_config(self, base: QuantSpec, layers: list[LayerScheme], skipped: list[str],
                            options: dict[str, Any]) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for s in layers:
            block = "channel" if s.group_size == -1 else f"block{s.group_size}"
            k = f"bits{s.bits}-{block}-{'sym' if s.sym else 'asym'}"
            counts[k] = counts.get(k, 0) + 1
        return {"quant_method": self.quant_method, "onnx_file": ONNX_FILE, "op": "com.microsoft.MatMulNBits",
                "bits": base.bits, "group_size": base.group_size, "sym": base.sym,
                "act_order": any(s.permuted for s in layers), "layers": dict(sorted(counts.items())),
                "unquantized": sorted(skipped), "method": (options.get("meta") or {}).get("method")}

    def how_to_load(self, path) -> list[str]:
        import json

        p = json.dumps(str(path))
        return ["import onnxruntime_genai as og",
                f"model = og.Model({p}); tokenizer = og.Tokenizer(model)",
                f"# or onnxruntime.InferenceSession({json.dumps(str(Path(path) / ONNX_FILE))})"]

    # ---- reading -----------------------------------------------------------------------------
    def open_checkpoint(self, path, config):
        raise ValueError(f"{path}: an ONNX artifact is run in ONNX Runtime (compress.evaluate.onnx_runtime), "
                         "not read back into torch")

    def patcher(self, qcfg, dense_dtype, block_prefix) -> BlockPatcher:
        raise ValueError("an ONNX artifact is run in ONNX Runtime, not patched into torch blocks")

    def weights_behind(self, name, shapes, read) -> Optional[int]:
        return None  # no safetensors: `tensor_summary` reads the graph

    def tensor_summary(self, path):
        import onnx
        from onnx import helper

        model = onnx.load(str(Path(path) / ONNX_FILE), load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        counted: set[str] = set()
        n = 0
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
                n += a["K"] * a["N"]
                counted.update(node.input[1:])
        for name, t in inits.items():
            if name not in counted and t.data_type == onnx.TensorProto.FLOAT and name not in ("cos_cache", "sin_cache"):
                n += int(torch.tensor(list(t.dims)).prod()) if t.dims else 1
        return n, [Path(path) / ONNX_FILE, Path(path) / DATA_FILE]

    def describe(self, qcfg: dict[str, Any]) -> list[str]:
        layers = ", ".join(f"{k} x{v}" for k, v in (qcfg.get("layers") or {}).items())
        return [f"quant_method=onnx, file={qcfg.get('onnx_file')}, op={qcfg.get('op')}, act_order={qcfg.get('act_order')}",
                f"quantized linears: {layers or 'none'}; method {qcfg.get('method')}; genai: {GENAI_CONFIG}"]
