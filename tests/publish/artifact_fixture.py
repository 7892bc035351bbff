"""A tiny artifact folder shaped like the pipeline's output (safetensors + json + manifest + results)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from compress.formats.seal import seal_json


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_artifact(
    root: Path, *, sharded: bool = False, results: bool = True, sealed: bool = True, license_: str | None = None,
    sanity: dict | None = None,
) -> Path:
    """`sealed=False` writes compress-results.json outside the manifest, as artifacts made before sealing did.
    `sanity`: the results' sanity record (compress/evaluate/sanity.py); none, as before the check existed."""
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.self_attn.q_proj.qweight": torch.randint(0, 2**31 - 1, (8, 16), generator=gen, dtype=torch.int32),
        "model.layers.0.self_attn.q_proj.scales": torch.rand(2, 16, generator=gen).half(),
        "lm_head.weight": torch.rand(32, 16, generator=gen),
    }
    if sharded:
        names = sorted(tensors)
        weight_map = {}
        for i, name in enumerate(names, start=1):
            shard = f"model-{i:05d}-of-{len(names):05d}.safetensors"
            save_file({name: tensors[name]}, str(root / shard))
            weight_map[name] = shard
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
        )
    else:
        save_file(tensors, str(root / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
        "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True,
                                "desc_act": False, "checkpoint_format": "gptq"},
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}))
    (root / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    (root / "generation_config.json").write_text(json.dumps({"do_sample": False}))

    outputs = {p.name: {"sha256": _sha(p), "bytes": p.stat().st_size} for p in sorted(root.iterdir()) if p.is_file()}
    manifest = {
        "compress_version": "0.1.0", "created": "2026-11-22T10:00:00Z",
        "config": {"model": "HuggingFaceTB/SmolLM2-135M", "quantize": {"method": "rtn", "bits": 4}},
        "packages": {"torch": "2.13.0", "transformers": "5.17.0"},
        "source": {"model": "HuggingFaceTB/SmolLM2-135M", "architecture": "LlamaForCausalLM",
                   "model_type": "llama", "files": {"model.safetensors": "0" * 64}, "license": license_},
        "quantization": {"method": "rtn", "format": "gptq", "bits": 4, "group_size": 64, "sym": True,
                         "desc_act": False, "skipped": ["lm_head"]},
        "calibration": {"dataset": "wikipedia", "nsamples": 128, "seqlen": 512, "seed": 0,
                        "windows_sha256": "ab" * 32},
        "outputs": outputs,
    }
    (root / "compress-manifest.json").write_text(json.dumps(manifest, indent=2))
    if results:
        data = {
            "protocol": {"name": "wikipedia-eval-nonoverlap", "dataset": "wikipedia", "split": "evaluation",
                         "windows": 40, "seqlen": 512, "description": "40 non-overlapping windows | held out"},
            "rows": [
                {"name": "original (fp32)", "perplexity": 17.7, "kl_divergence": 0.0, "top1_agreement": 1.0,
                 "bytes": 538000000, "bits_per_weight": 32.0, "prefill_tokens_per_s": 900.0,
                 "decode_tokens_per_s": 40.0, "serving_peak_rss_mb": 700.0},
                {"name": "rtn-w4-g64", "perplexity": 25.1, "kl_divergence": 0.2, "top1_agreement": 0.8,
                 "bytes": None},
            ],
            "this": "rtn-w4-g64",
        }
        if sanity is not None:
            data["sanity"] = sanity
        if sealed:
            seal_json(root, "compress-results.json", data)
        else:
            (root / "compress-results.json").write_text(json.dumps(data))
    return root
