"""Memory needed to serve a model: weights + KV cache + a fixed runtime overhead.

    KV cache bytes = 2 (K and V) x layers x kv_heads x head_dim x context_length x batch x bytes/element

`kv_heads` is `num_key_value_heads`: with grouped-query attention (GQA) several query heads share
one K/V head, so the cache is `num_attention_heads / num_key_value_heads` times smaller than with
plain multi-head attention (SmolLM2-135M: 9 query heads, 3 KV heads). The cache is stored in
`serving.kv_dtype` (2 bytes for float16/bfloat16, 1 for an fp8 cache), independent of the weights'
quantization. Sliding-window layers (Mistral, Gemma 2/3) are counted at full context, so for them
this is an upper bound.

Weights are the bytes of the tensors as stored in the artifact's safetensors files (read from the
headers): a GPTQ kernel keeps the packed int32 codes, fp16 scales/zeros and the fp16 embeddings
in memory exactly as stored, so this is the in-memory size, not an estimate; it differs from the
file size only by the JSON headers. `overhead_gb` covers the CUDA context, kernel workspaces,
activations and allocator slack, which depend on the runtime and are not modelled.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GIB = 2**30

KV_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}


@dataclass(frozen=True)
class AttentionShape:
    layers: int
    kv_heads: int
    head_dim: int


def attention_shape(config) -> AttentionShape:
    """Layers, KV heads and head size from a transformers config (Llama, Gemma, OPT, GPT-2 names)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names: str) -> Optional[int]:
        for n in names:
            v = getattr(config, n, None)
            if v is not None:
                return int(v)
        return None

    layers = first("num_hidden_layers", "n_layer")
    heads = first("num_attention_heads", "n_head")
    hidden = first("hidden_size", "n_embd")
    if layers is None or heads is None or hidden is None:
        raise ValueError(f"{type(config).__name__}: cannot read layers/heads/hidden size for the KV cache")
    kv_heads = first("num_key_value_heads") or heads
    head_dim = first("head_dim") or hidden // heads
    return AttentionShape(layers, kv_heads, head_dim)


def kv_cache_bytes(shape: AttentionShape, context_length: int, batch: int, kv_dtype: str) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * context_length * batch * KV_BYTES[kv_dtype]


def safetensors_tensor_bytes(folder: Path) -> int:
    """Sum of tensor data bytes over the folder's *.safetensors, *.gguf and *.onnx files (headers
    and the graph excluded; an ONNX file's initializers counted where their data lies)."""
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    for f in sorted(Path(folder).glob("*.gguf")):  # a GGUF artifact: its tensors' bytes, from the header
        from gguf import GGUFReader

        total += sum(int(t.n_bytes) for t in GGUFReader(str(f)).tensors)
    for f in sorted(Path(folder).glob("*.onnx")):  # an ONNX artifact: its initializers' bytes
        import onnx

        for t in onnx.load(str(f), load_external_data=False).graph.initializer:
            ext = {e.key: e.value for e in t.external_data}
            total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


@dataclass(frozen=True)
class ServingNeed:
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes


def serving_need(weights_bytes: int, shape: AttentionShape, serving) -> ServingNeed:
    """`serving` is a `ServingConfig` (context_length, batch, kv_dtype, overhead_gb)."""
    kv = kv_cache_bytes(shape, serving.context_length, serving.batch, serving.kv_dtype)
    return ServingNeed(weights_bytes, kv, int(round(serving.overhead_gb * GIB)))


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float  # as the vendor names it; treated as GiB (an "80 GB" H100 reports 79.6 GiB usable)


def default_gpus_path() -> Path:
    return Path(__file__).resolve().parent.parent / "configs" / "gpus.yaml"


# Used when serving.gpus is not set and configs/gpus.yaml is not beside the package (a wheel install).
DEFAULT_GPUS = [GPU(f"{g} GB", g) for g in (8, 12, 16, 24, 48, 80)]


def load_gpus(path: Optional[str | Path] = None) -> list[GPU]:
    import yaml

    p = Path(path) if path else default_gpus_path()
    if not p.is_file():
        if path is None:
            return list(DEFAULT_GPUS)
        raise ValueError(f"serving.gpus: {p} not found" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"serving.gpus: {p}: not UTF-8 text ({e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(f"serving.gpus: {p}: not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None
    rows = data.get("gpus") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"serving.gpus: {p} must hold a list under 'gpus:'")
    gpus = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or set(r) != {"name", "memory_gb"}:
            raise ValueError(f"serving.gpus: {p}: gpus.{i} needs exactly 'name' and 'memory_gb'")
        if isinstance(r["memory_gb"], bool) or not isinstance(r["memory_gb"], (int, float)):
            raise ValueError(f"serving.gpus: {p}: gpus.{i}.memory_gb must be a number, not {r['memory_gb']!r}")
        gpus.append(GPU(str(r["name"]), float(r["memory_gb"])))
    return sorted(gpus, key=lambda g: g.memory_gb)


def fits(need: ServingNeed, gpus: list[GPU]) -> list[str]:
    """Names of the GPUs whose memory holds the whole need."""
    return [g.name for g in gpus if need.total_bytes <= g.memory_gb * GIB]
