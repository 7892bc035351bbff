"""Read our own artifacts back: GPTQ-layout linears become `QuantLinear`s as blocks stream in.

Evaluation runs on these modules, so what is measured is the exported bytes, not the
in-memory fake quantization that produced them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from compress.engine import StreamedModel
from compress.formats.gptq import SUFFIXES
from compress.formats.quant_linear import QuantLinear, dequantized_linear
from compress.models.checkpoint import open_checkpoint


def _layer_geometry(t: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Bits and group size of one linear, read from its tensor shapes (overrides may differ)."""
    in_f = t["g_idx"].numel()
    bits = t["qweight"].shape[0] * 32 // in_f
    n_groups = t["scales"].shape[0]
    return bits, (-1 if n_groups == 1 else in_f // n_groups)


def gptq_patcher(sym: bool, dense_dtype: Optional[torch.dtype] = None):
    """Swap each GPTQ-layout linear of a block for a module built from its packed tensors:
    `QuantLinear` (dequantizes in every forward, as a serving kernel would), or with
    `dense_dtype` an `nn.Linear` holding the same dequantized weights once, for the block's short life in
    evaluation, where it saves one dequantization per batch of windows."""

    def patch(block: nn.Module, i: int, tensors: dict[str, torch.Tensor]) -> list[str]:
        names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
        for n in names:
            t = {s: tensors.pop(f"{n}.{s}") for s in SUFFIXES}
            bias = tensors.pop(f"{n}.bias", None)
            if bias is not None:
                t["bias"] = bias
            bits, gs = _layer_geometry(t)
            ql = QuantLinear.from_gptq_tensors(lambda k, t=t, n=n: t.get(k[len(n) + 1 :]), n, bits, gs, sym)
            if dense_dtype is not None:
                ql = dequantized_linear(ql.quantized_weight(), ql.bias, dtype=dense_dtype)
            block.set_submodule(n, ql)
        return names

    return patch


def open_artifact(
    path: str | Path, device: torch.device, dtype: torch.dtype, dense: bool = False
) -> StreamedModel:
    from transformers import AutoConfig

    path = Path(path)
    qcfg = json.loads((path / "config.json").read_text()).get("quantization_config", {})
    if qcfg.get("quant_method") != "gptq":
        raise ValueError(f"{path}: not a GPTQ artifact (quant_method={qcfg.get('quant_method')})")
    config = AutoConfig.from_pretrained(str(path))
    return StreamedModel(
        config, open_checkpoint(path), device, dtype,
        patch_block=gptq_patcher(bool(qcfg.get("sym", True)), dtype if dense else None), stored_outer=dense,
    )
