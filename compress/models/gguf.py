"""Turn a GGUF file into a cached Hugging Face folder of fp32 safetensors, once.

GGUF tensors are dequantized by transformers' GGUF loader; the result is saved so that every
later run streams blocks from safetensors like any other checkpoint. The conversion itself
holds the model once in memory; it is cached by the GGUF file's content hash.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from compress.hashing import sha256_file
from compress.models.checkpoint import CheckpointError

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


def check_gguf(path: Path) -> None:
    """The GGUF header and tensor table, read without loading any tensor: a file that is not
    GGUF or was cut short fails here naming the file, instead of deep inside the conversion."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF files needs the gguf package: pip install 'compress[gguf]'") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader fails on a cut or garbled file with numpy/struct errors of any kind
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(
                f"{path}: truncated GGUF file: tensor '{t.name}' ends at byte {t.data_offset + t.n_bytes}, "
                f"the file has {size}"
            )


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Path of a folder holding the dequantized checkpoint (converted on first use)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    digest = sha256_file(gguf_path)[:16]
    target = (cache_dir or default_cache_dir()) / "gguf" / f"{gguf_path.stem}-{digest}-v{CONVERSION_VERSION}"
    if (target / "config.json").is_file():
        return target
    check_gguf(gguf_path)
    log.info("converting %s to fp32 safetensors in %s (once)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
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
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
