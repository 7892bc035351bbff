"""llm-compressor on a model folder with given calibration windows; run in .venv-llmc.

    python benchmarks/peers/llmc_quantize.py MODEL_DIR WINDOWS.safetensors OUT_DIR BITS GROUP [RECIPE]

RECIPE (default gptq), lm_head ignored in each, every setting not named here llm-compressor's default:
  - gptq: GPTQModifier, weights int symmetric, `group` strategy with GROUP columns (dampening
    0.01, block 128, static activation order);
  - awq: AWQModifier (duo scaling, a 20-point grid, its Llama mappings), weights int
    asymmetric, GROUP columns: the recipe of llm-compressor's W4A16_ASYM preset at GROUP;
  - w8a8: SmoothQuantModifier (smoothing strength 0.5) then GPTQModifier with the W8A8 preset
    (int8 per-channel symmetric weights, dynamic per-token int8 activations); BITS and GROUP
    must be 8 and -1.
Writes OUT_DIR/compressed (the compressed-tensors folder it publishes: its bytes are the ones
reported, and the awq/w8a8 rows are evaluated from it by compress's compressed-tensors reader,
activation quantization included). For gptq it also writes OUT_DIR/dense (the weights as they
stand after GPTQ, fp32, no quantization_config), which the gptq rows evaluate. Prints one JSON
line with the seconds spent in `oneshot()` alone.
"""
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file


def recipe_for(kind: str, bits: int, group: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def weights(sym: bool):
        return QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group)

    if kind == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights(True))},
                            ignore=["lm_head"])
    if kind == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return AWQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights(False))},
                           ignore=["lm_head"])
    if kind == "w8a8":
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        if (bits, group) != (8, -1):
            raise SystemExit("w8a8 takes BITS 8 and GROUP -1")
        return [SmoothQuantModifier(), GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    raise SystemExit(f"unknown recipe {kind!r}: gptq, awq or w8a8")


def settings_of(recipe) -> dict:
    mods = recipe if isinstance(recipe, list) else [recipe]
    keep = ("dampening_frac", "block_size", "actorder", "smoothing_strength", "duo_scaling", "n_grid", "scheme")
    return {type(m).__name__: {k: str(getattr(m, k)) for k in keep if hasattr(m, k)} for m in mods}


def main(model_dir: str, windows: str, out_dir: str, bits: str, group: str, kind: str = "gptq") -> None:
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        # llm-compressor 0.14.0.1's AWQ pins its activation cache (`cache.pin_memory`), which
        # raises "Cannot access accelerator device" on a CPU-only machine. Pinning only speeds
        # host-to-GPU copies, so on a CPU it is the identity.
        torch.Tensor.pin_memory = lambda self, *a, **k: self
    ids = load_file(windows)["input_ids"]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    recipe = recipe_for(kind, int(bits), int(group))
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0

    if kind == "gptq":
        write_dense(model, tok, out_dir)
    model.save_pretrained(f"{out_dir}/compressed", save_compressed=True)
    tok.save_pretrained(f"{out_dir}/compressed")
    print(json.dumps({"quantize_seconds": seconds, "version": f"llmcompressor {llmcompressor.__version__}",
                      "settings": {"recipe": kind, "bits": int(bits), "group_size": int(group), **settings_of(recipe)}}))


def write_dense(model, tok, out_dir: str) -> None:
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


if __name__ == "__main__":
    main(*sys.argv[1:])
