"""Read our own artifacts back: quantized linears become `QuantLinear`s as blocks stream in.

Evaluation runs on these modules, so what is measured is the exported bytes, not the
in-memory fake quantization that produced them. The format is recognised from
`quantization_config.quant_method` and reads its own layout (`compress.formats.registry`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.engine import StreamedModel
from compress.formats.registry import format_of_artifact
from compress.models.arch import arch_for


def open_artifact(
    path: str | Path, device: torch.device, dtype: torch.dtype, dense: bool = False
) -> StreamedModel:
    from transformers import AutoConfig

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    qcfg = raw.get("quantization_config", {})
    try:
        fmt = format_of_artifact(qcfg)
    except ValueError as e:
        raise ValueError(f"{path}: not an artifact compress reads: {e}") from None
    config = AutoConfig.from_pretrained(str(path))
    prefix = arch_for(config.model_type).blocks + "."
    return StreamedModel(
        config, fmt.open_checkpoint(path, config), device, dtype,
        patch_block=fmt.patcher(qcfg, dtype if dense else None, prefix), stored_outer=dense,
        patch_head=fmt.patcher(qcfg, None, prefix),  # a quantized head stays packed; read a slice at a time
        read_embedding=lambda name, t: fmt.read_embedding(qcfg, name, t),
    )
