"""Run an ONNX artifact (`formats.onnx_format`) in ONNX Runtime: logits, greedy decoding with
the KV cache and the evaluation protocol's head inputs. Speed is measured like every other
artifact's (`compress.evaluate.speed`, through the `onnx` runtime of `compress.runtime`).

Evaluation follows the protocol of the safetensors candidates (`stages.evaluate`): the same
windows; the decoder runs in ONNX Runtime up to the final norm (a graph output added to a
copy of the graph, `FINAL_NORM`), and the head is read from the artifact's own data file a
slice of vocabulary rows at a time (`vocab_stream.vocab_metrics`), so the ONNX candidate's
perplexity, KL and top-1 come from the same code, against the same original logits.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from compress.formats.onnx_graph import FINAL_NORM
from compress.formats.onnx_writer import GENAI_CONFIG, ONNX_FILE

RUNTIME = "onnxruntime"


class OrtDecoder:
    """One ONNX Runtime session over an artifact's decoder (CPU)."""

    def __init__(self, path, extra_outputs: tuple[str, ...] = (), threads: Optional[int] = None):
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        dec = json.loads((self.path / GENAI_CONFIG).read_text())["model"]["decoder"]
        self.layers, self.kv_heads, self.head_dim = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        model: object = str(self.path / ONNX_FILE)
        if extra_outputs:  # the graph with more outputs, from memory; its data stays in the artifact
            m = onnx.load(model, load_external_data=False)
            for name in extra_outputs:
                m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path))
            model = m.SerializeToString()
        self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {f"past_key_values.{i}.{k}": z for i in range(self.layers) for k in ("key", "value")}

    def run(self, ids: np.ndarray, past: dict[str, np.ndarray], outputs: Optional[list[str]] = None):
        """(outputs by name) for `ids` [batch, seq] after `past` (presents renamed as pasts)."""
        total = ids.shape[1] + next(iter(past.values())).shape[2]
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((ids.shape[0], total), np.int64), **past}
        names = outputs or [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))

    def presents(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in range(self.layers) for k in ("key", "value")}

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] of whole sequences (no past)."""
        out = self.run(ids.numpy(), self.empty_past(ids.shape[0]), ["logits"])
        return torch.from_numpy(out["logits"])

    def greedy(self, ids: torch.Tensor, new: int) -> list[int]:
        """`new` greedy tokens after the prompt `ids` [1, seq], decoding one token at a time with the cache."""
        out = self.run(ids.numpy(), self.empty_past(1))
        toks = []
        for _ in range(new):
            nxt = int(out["logits"][0, -1].argmax())
            toks.append(nxt)
            out = self.run(np.array([[nxt]]), self.presents(out))
        return toks


def head_inputs(path, eval_ids: torch.Tensor) -> torch.Tensor:
    """The head's inputs [windows, L, hidden] of every evaluation window, run in ONNX Runtime,
    as the head multiplies them: a quantized head at accuracy_level 4 first rounds them to int8
    per block of its block size (`int8_blocks`), so the KL reported is the graph's."""
    dec = OrtDecoder(path, extra_outputs=(FINAL_NORM,))
    rows = []
    for w in range(eval_ids.shape[0]):
        out = dec.run(eval_ids[w : w + 1].numpy(), dec.empty_past(1), [FINAL_NORM])
        rows.append(torch.from_numpy(out[FINAL_NORM]))
    x = torch.cat(rows)
    _, node, _ = _head_node(path)
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "MatMulNBits" and attrs.get("accuracy_level", 0) == 4:
        x = int8_blocks(x, attrs["block_size"])
    return x


def int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """`x` [..., K] as MatMulNBits at accuracy_level 4 sees it (MLAS's CompInt8 path): each run
    of `block` values along K rounded to symmetric int8 with scale max|x| / 127, nearest even."""
    K = x.shape[-1]
    pad = (-K) % block
    xb = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block)
    scale = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round(xb * inv).clamp(-127, 127)
    return (q * scale).reshape(*x.shape[:-1], -1)[..., :K]


def _head_node(path):
    """(graph, the node whose output becomes `logits`, initializers by name)."""
    import onnx

    m = onnx.load(str(Path(path) / ONNX_FILE), load_external_data=False)
    node = next(n for n in m.graph.node if n.op_type in ("Gemm", "MatMulNBits") and n.output[0] in _logit_sources(m))
    return m, node, {t.name: t for t in m.graph.initializer}


def head_slices(path, rows: int) -> Iterator[tuple[int, torch.Tensor, None]]:
    """The head table [vocab, hidden] of the graph's Gemm (or of a quantized head's MatMulNBits,
    dequantized), read from the data file in slices of rows."""
    _, node, inits = _head_node(path)

    def table(name: str, dtype) -> np.memmap:
        ext = {e.key: e.value for e in inits[name].external_data}
        return np.memmap(Path(path) / ext["location"], dtype, "r", int(ext["offset"]), tuple(inits[name].dims))

    if node.op_type == "MatMulNBits":  # a quantized head: its codes dequantized a slice at a time
        from compress.formats.matmulnbits import dequantize_rows

        attrs = {a.name: a.i for a in node.attribute}
        B, sc = table(node.input[1], np.uint8), table(node.input[2], np.float32)
        zp = table(node.input[3], np.uint8) if len(node.input) > 3 and node.input[3] else None
        for start in range(0, attrs["N"], rows):
            part = (torch.from_numpy(np.array(t[start : start + rows])) for t in (B, sc))
            z = None if zp is None else torch.from_numpy(np.array(zp[start : start + rows]))
            yield start, dequantize_rows(*part, z, attrs["K"], attrs["bits"]), None
        return
    vocab, hidden = inits[node.input[1]].dims
    head = table(node.input[1], np.float32)
    for start in range(0, vocab, rows):
        yield start, torch.from_numpy(np.array(head[start : start + rows])), None


def _logit_sources(m) -> set[str]:
    """The outputs that the graph reshapes into `logits`: the head's."""
    return {n.input[0] for n in m.graph.node if n.output and n.output[0] == "logits"}


class OnnxCandidate:
    """What `stages.evaluate.evaluate_streams` reads of a candidate, for an ONNX artifact:
    head inputs from ONNX Runtime, the head from the artifact's data file."""

    def __init__(self, path):
        from types import SimpleNamespace

        self.path = Path(path)
        self.config = SimpleNamespace(final_logit_softcapping=None)  # no mapped family has one

    def head_inputs(self, eval_ids: torch.Tensor) -> torch.Tensor:
        return head_inputs(self.path, eval_ids)

    def head_slices(self, rows: int):
        return head_slices(self.path, rows)
