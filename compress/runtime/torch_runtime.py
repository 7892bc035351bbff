"""The torch runtime: a float model folder, or an artifact of one of compress's safetensors or
GGUF formats read by our loader, with its quantized linears on the fastest CPU kernel that
holds them (`compress.runtime.kernels`) and the transformers KV cache."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from compress.runtime import kernels
from compress.runtime.registry import register_runtime


def _dtype_for(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.float16


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


class TorchDecoder:
    def __init__(self, model: torch.nn.Module, label: str, device: torch.device, kernels_used: dict[str, str]):
        self.model = model.eval()
        self.label = label
        self.device = device
        self.kernels = kernels_used  # layer -> kernel, for the record
        self.vocab_size = int(model.config.vocab_size)
        # Only the last position's logits: what transformers' own generate asks for.
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self._past = None

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids.to(self.device), use_cache=True, **self._keep)
        self._past = out.past_key_values
        return out.logits[0, -1].float()

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        if self._past is None:
            raise RuntimeError("step() before prefill()")
        ids = torch.tensor([[token]], device=self.device)
        out = self.model(input_ids=ids, past_key_values=self._past, use_cache=True, **self._keep)
        self._past = out.past_key_values
        return out.logits[0, -1].float()


@register_runtime("dense")
def open_dense(path: Path, kind: str, device: torch.device) -> TorchDecoder:
    from transformers import AutoModelForCausalLM

    dtype = _dtype_for(device)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    return TorchDecoder(model, f"torch {_dtype_name(dtype)}", device, {})


@register_runtime("gptq", "compressed-tensors", "awq", "gguf")
def open_quantized(path: Path, kind: str, device: torch.device) -> TorchDecoder:
    from compress.formats.artifact import open_artifact

    dtype = _dtype_for(device)
    model = open_artifact(path, device, dtype).materialize_all()
    used = kernels.accelerate(model, device)
    # A GGUF artifact's blocks are decoded to float at load (compress/formats/gguf.py's patcher).
    dense = f"torch {_dtype_name(dtype)}" + (" (GGUF dequantized at load)" if kind == "gguf" else "")
    return TorchDecoder(model, kernels.summary(used, dense), device, used)
