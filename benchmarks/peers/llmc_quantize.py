"""llm-compressor's GPTQModifier on a model folder with given calibration windows; run in .venv-llmc.

    python benchmarks/peers/llmc_quantize.py MODEL_DIR WINDOWS.safetensors OUT_DIR BITS GROUP

Weights int, symmetric, `group` strategy with GROUP columns; lm_head ignored; every other
setting is llm-compressor's default (dampening 0.01, block 128, static activation order).
Writes OUT_DIR/compressed (the pack-quantized compressed-tensors folder it publishes: its bytes
are the ones reported) and OUT_DIR/dense (the same model's weights as they stand after GPTQ,
fp32, no quantization_config: what the benchmark evaluates, since our evaluator does not read
compressed-tensors). Prints one JSON line with the seconds spent in `oneshot()` alone.
"""
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file


def main(model_dir: str, windows: str, out_dir: str, bits: str, group: str) -> None:
    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(windows)["input_ids"]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    weights = QuantizationArgs(num_bits=int(bits), type="int", symmetric=True, strategy="group", group_size=int(group))
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]
    )
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0

    # The weights after GPTQ are already on the quantization grid (llm-compressor writes the
    # dequantized values back into each Linear); drop the scale/zero-point tensors.
    dense = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()
             if not k.endswith(("weight_scale", "weight_zero_point", "weight_g_idx"))}
    if model.config.tie_word_embeddings:
        dense.pop("lm_head.weight", None)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    os.makedirs(f"{out_dir}/dense", exist_ok=True)
    save_file(dense, f"{out_dir}/dense/model.safetensors", metadata={"format": "pt"})
    with open(f"{out_dir}/dense/config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    tok.save_pretrained(f"{out_dir}/dense")
    model.save_pretrained(f"{out_dir}/compressed", save_compressed=True)
    tok.save_pretrained(f"{out_dir}/compressed")
    print(json.dumps({"quantize_seconds": seconds, "version": f"llmcompressor {llmcompressor.__version__}",
                      "settings": {"bits": int(bits), "group_size": int(group), "symmetric": True,
                                   "dampening_frac": recipe.dampening_frac, "block_size": recipe.block_size,
                                   "actorder": str(recipe.actorder)}}))


if __name__ == "__main__":
    main(*sys.argv[1:])
