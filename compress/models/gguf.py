"""Turn a GGUF file into a cached Hugging Face folder of fp32 safetensors, once.

GGUF tensors are dequantized by transformers' GGUF loader; the result is saved so that every
later run streams blocks from safetensors like any other checkpoint. The conversion itself
holds the model once in memory; it is cached by the GGUF file's content hash. It is written in
a ``.partial-`` sibling renamed into place when complete; the sibling of a conversion that was
killed is removed by a later conversion once its owner is gone (compress/owner.py).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from compress.hashing import sha256_file
from compress.owner import OWNER, make_partial, sweep_dead

log = logging.getLogger(__name__)

# Bumped when the converted folder changes shape, so stale caches are converted again.
# 2: config.json no longer claims `quantization_config: gguf` for the dequantized fp32 weights
# (GPTQModel and transformers took such a folder for an already-quantized checkpoint).
CONVERSION_VERSION = 2


def default_cache_dir() -> Path:
    base = os.environ.get("COMPRESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "compress"
    )
    return Path(base)


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Path of a folder holding the dequantized checkpoint (converted on first use)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    digest = sha256_file(gguf_path)[:16]
    target = (cache_dir or default_cache_dir()) / "gguf" / f"{gguf_path.stem}-{digest}-v{CONVERSION_VERSION}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to fp32 safetensors in %s (once)", gguf_path.name, target)
    sweep_dead(target.parent)
    tmp = make_partial(target.parent, f".{target.name}.partial-")
    try:
        kwargs = dict(gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), dtype=torch.float32, **kwargs
        )
        model.hf_quantizer = None  # a GGUF-loaded model refuses to save otherwise
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config  # the saved weights are plain fp32
        model.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs).save_pretrained(str(tmp))
        (tmp / "compress-source.txt").write_text(f"{gguf_path}\nsha256-prefix {digest}\n")
        (tmp / OWNER).unlink()
        try:
            os.replace(tmp, target)
        except OSError:  # a concurrent conversion of the same file finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
