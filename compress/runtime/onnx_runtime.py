"""The ONNX Runtime runtime: an ONNX artifact (`export.format: onnx`) decoded with its own KV
cache in an ONNX Runtime CPU session (`compress.evaluate.onnx_runtime.OrtDecoder`), so
`compress generate` runs the graph a user of onnxruntime-genai runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compress.runtime.registry import register_runtime


class OnnxDecoder:
    def __init__(self, path: Path):
        import json

        from compress.evaluate.onnx_runtime import RUNTIME, OrtDecoder
        from compress.formats.onnx_writer import GENAI_CONFIG

        self.ort = OrtDecoder(path)
        self.vocab_size = int(json.loads((Path(path) / GENAI_CONFIG).read_text())["model"]["vocab_size"])
        ops = {n.op_type for n in self._graph_nodes(path)}
        self.label = f"{RUNTIME} " + ("MatMulNBits" if "MatMulNBits" in ops else "float MatMul")
        self._out = None

    @staticmethod
    def _graph_nodes(path: Path):
        import onnx

        from compress.formats.onnx_writer import ONNX_FILE

        return onnx.load(str(Path(path) / ONNX_FILE), load_external_data=False).graph.node

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self._out = self.ort.run(ids.numpy(), self.ort.empty_past(1))
        return torch.from_numpy(self._out["logits"][0, -1].copy())

    def step(self, token: int) -> torch.Tensor:
        if self._out is None:
            raise RuntimeError("step() before prefill()")
        self._out = self.ort.run(np.array([[token]], np.int64), self.ort.presents(self._out))
        return torch.from_numpy(self._out["logits"][0, -1].copy())


@register_runtime("onnx")
def open_onnx(path: Path, kind: str, device: torch.device) -> OnnxDecoder:
    from compress.models.checkpoint import CheckpointError

    if device.type != "cpu":
        raise CheckpointError(f"{path}: ONNX artifacts run on the CPU execution provider; drop --device {device}")
    try:
        return OnnxDecoder(path)
    except ImportError as e:
        raise CheckpointError(f"{path}: an ONNX artifact needs onnx and onnxruntime ({e}); "
                              "pip install 'compress[onnx]'") from None
