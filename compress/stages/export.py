"""Stage: write a candidate as a GPTQ-layout safetensors folder, block by block.

The writer works in a temporary sibling folder and renames it at the end, so an interrupted
run never leaves a folder that looks complete (`compress-manifest.json` is written last).
"""
from __future__ import annotations

import datetime as _dt
import logging
import re
import dataclasses
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from compress import __version__
from compress.config import RunConfig
from compress.engine import StreamedModel
from compress.formats import gptq
from compress.formats.qweight import QuantizedWeight
from compress.formats.writer import ArtifactWriter
from compress.models.provenance import describe_source
from compress.stages.load import LoadedModel
from compress.stages.quantize import Plan, layer_spec

log = logging.getLogger(__name__)

# Files copied from the source folder: tokenizer, chat template, generation defaults, license.
_COPY = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|vocab\.json|merges\.txt|added_tokens\.json|"
    r"chat_template\.(jinja|json)|generation_config\.json|LICENSE.*|.*\.tiktoken)$"
)
_PACKAGES = ("compress", "torch", "transformers", "safetensors", "numpy")


def package_versions() -> dict[str, str]:
    out = {}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    return out


class GPTQExporter:
    """Receives quantized blocks from the quantize stage and writes them as they come."""

    def __init__(self, loaded: LoadedModel, sm: StreamedModel, plan: Plan, cfg: RunConfig, out_dir: Path):
        self.loaded, self.sm, self.plan, self.cfg = loaded, sm, plan, cfg
        self.dtype = getattr(torch, cfg.export.dtype)
        self.out_dir = out_dir
        self.writer = ArtifactWriter(
            out_dir, overwrite=cfg.export.overwrite, max_shard_bytes=cfg.export.max_shard_bytes
        )
        self.skipped: list[str] = []
        self.dynamic: dict[str, dict] = {}
        self.quantized_params = 0
        self.quantized_bytes = 0
        self.permuted = False  # any layer stored with an act-order g_idx
        self._write_outer()

    @property
    def linear_bits_per_weight(self) -> float:
        """Bits per quantized weight including scales, zeros and g_idx."""
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", self.dtype if t.is_floating_point() else t.dtype).contiguous()

    def _write_outer(self, rows_per_slice: int = 4096) -> None:
        """Every tensor outside the block list, read from the checkpoint (not the model, whose
        memory-mapped embedding would stay resident once read) and cast slice by slice: the
        embedding is the largest tensor of a small model."""
        model = self.sm.model
        out_emb = model.get_output_embeddings()
        tied = out_emb is not None and out_emb.weight is model.get_input_embeddings().weight
        # transformers re-ties lm_head to the embedding on load; storing it twice is waste
        tied_name = f"{[n for n, m in model.named_modules() if m is out_emb][0]}.weight" if tied else None
        ckpt = self.sm.checkpoint
        for name, t in model.state_dict().items():
            if name.startswith(self.sm.block_prefix) or name == tied_name:
                continue
            ck = self.sm.ckpt_name(name)
            if ck is None:
                raise ValueError(f"{ckpt.root}: tensor '{name}' is missing from the checkpoint")
            dtype = self.dtype if t.is_floating_point() else t.dtype
            if t.dim() == 0:
                self.writer.add_tensors({name: self._cast(ckpt.load([ck])[ck])})
                continue
            rows = range(0, t.shape[0], rows_per_slice)
            slices = (self._cast(ckpt.load_rows(ck, s, s + rows_per_slice)) for s in rows)
            self.writer.add_tensor_chunks(name, dtype, tuple(t.shape), slices)

    def add_block(self, i: int, block: nn.Module, qweights: dict[str, QuantizedWeight]) -> None:
        prefix = f"{self.sm.block_prefix}{i}."
        tensors: dict[str, torch.Tensor] = {}
        for name, t in block.state_dict().items():
            if name.rsplit(".", 1)[0] in qweights:
                continue
            tensors[prefix + name] = self._cast(t)
        for name, qw in qweights.items():
            mod = block.get_submodule(name)
            bias = getattr(mod, "bias", None)
            lin = gptq.linear_tensors(prefix + name, _to_cpu(qw), None if bias is None else bias.detach().cpu())
            self.permuted |= qw.desc_act
            self.quantized_params += qw.codes.numel()
            self.quantized_bytes += sum(v.numel() * v.element_size() for k, v in lin.items() if not k.endswith(".bias"))
            tensors.update(lin)
            spec = (qw.bits, qw.group_size)
            if spec != (self.plan.q.bits, self.plan.q.group_size):
                self.dynamic[f"+:^{re.escape(prefix + name)}$"] = {"bits": qw.bits, "group_size": qw.group_size}
        from transformers.pytorch_utils import Conv1D

        for name, mod in block.named_modules():
            if isinstance(mod, (nn.Linear, Conv1D)) and name not in qweights:
                self.skipped.append(prefix + name)
        self.writer.add_tensors(tensors)

    def _copy_side_files(self) -> None:
        for p in sorted(self.loaded.root.iterdir()):
            if p.is_file() and _COPY.match(p.name):
                self.writer.add_file(p.name, p)

    def finish(self, manifest: dict) -> Path:
        q = self.plan.q
        qcfg = gptq.quantization_config(
            q.bits, q.group_size, q.sym, self.permuted,
            modules_to_not_convert=self.skipped, dynamic=self.dynamic or None,
            damp_percent=q.damp_percent, true_sequential=q.propagate,
            meta={"quantizer": [f"compress:{__version__}"], "method": q.method},
        )
        config = self.loaded.config.to_dict()
        config["quantization_config"] = qcfg
        config["dtype"] = self.cfg.export.dtype
        self.writer.add_file("quantize_config.json", _json_bytes(qcfg))
        self._copy_side_files()
        manifest = dict(manifest)
        manifest["quantization"] = {
            "method": q.method, "format": "gptq", "bits": q.bits, "group_size": q.group_size,
            "sym": q.sym, "desc_act": self.permuted, "static_groups": q.static_groups,
            "mse_clip": q.mse_clip, "propagate": q.propagate, "damp_percent": q.damp_percent,
            "skipped": self.skipped, "overrides": self.dynamic,
            "quantized_params": self.quantized_params,
            "linear_bits_per_weight": self.linear_bits_per_weight,
        }
        return self.writer.finish(config, manifest)

    def abort(self) -> None:
        self.writer.abort()


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    return dataclasses.replace(
        qw, codes=qw.codes.cpu(), scales=qw.scales.cpu(), zeros=qw.zeros.cpu(), g_idx=qw.g_idx.cpu()
    )


def _json_bytes(obj) -> bytes:
    import json

    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def base_manifest(cfg: RunConfig, loaded: LoadedModel, input_hashes: dict[str, str],
                  calibration: Optional[dict]) -> dict:
    return {
        "compress_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": cfg.model_dump(mode="json"),
        "packages": package_versions(),
        "source": {
            "model": loaded.source,
            "architecture": (loaded.config.architectures or ["?"])[0],
            "model_type": loaded.config.model_type,
            "files": input_hashes,
            **describe_source(loaded.root),  # name, hub_id, license, language, gguf: for the model card
        },
        "calibration": calibration,
    }
