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
import re
import shutil
from pathlib import Path
from typing import Optional

from compress.hashing import sha256_file
from compress.models.checkpoint import CheckpointError
from compress.models.provenance import is_hub_id
from compress.owner import OWNER, make_partial, sweep_dead

log = logging.getLogger(__name__)

# Bumped when the converted folder changes shape, so stale caches are converted again.
# 2: config.json no longer claims `quantization_config: gguf` for the dequantized fp32 weights
# (GPTQModel and transformers took such a folder for an already-quantized checkpoint).
# 3: the tokenizer is checked against the GGUF vocabulary and as saved (compress/models/tokenizer_check.py).
CONVERSION_VERSION = 3
# In a converted folder instead of tokenizer files: why no tokenizer could be saved (one line).
TOKENIZER_PROBLEM = "compress-tokenizer-problem.txt"


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
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path).resolve()
    digest = sha256_file(gguf_path)[:16]
    target = (cache_dir or default_cache_dir()) / "gguf" / f"{gguf_path.stem}-{digest}-v{CONVERSION_VERSION}"
    if (target / "config.json").is_file():
        return target
    check_gguf(gguf_path)
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
        del model
        problem = save_tokenizer(gguf_path, tmp)
        if problem:
            log.warning("%s", problem)
            (tmp / TOKENIZER_PROBLEM).write_text(problem + "\n")
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


def build_tokenizer(gguf_path: Path):
    """The tokenizer of a GGUF file and the problem its checks found (None when they pass):
    transformers' conversion, or, where that one misreads a SentencePiece vocabulary, the
    SentencePiece-BPE tokenizer built from the vocabulary (compress/models/gguf_vocab.py)."""
    from transformers import AutoTokenizer

    from compress.models.gguf_vocab import SPM_MODELS, ensure_bos, read_vocab, spm_tokenizer
    from compress.models.tokenizer_check import against_gguf, problem_message, round_trip

    vocab = read_vocab(gguf_path)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if vocab:
        tok = ensure_bos(tok, vocab)
    problem = against_gguf(tok, vocab) if vocab else None
    if problem and vocab.model in SPM_MODELS and vocab.scores:
        log.info("transformers' tokenizer for %s %s; building it from the GGUF vocabulary instead", gguf_path.name, problem)
        tok = spm_tokenizer(vocab)
        problem = against_gguf(tok, vocab)
    problem = problem or round_trip(tok)
    return tok, problem and problem_message(f"the tokenizer built from {gguf_path.name}", problem)


def save_tokenizer(gguf_path: Path, folder: Path) -> Optional[str]:
    """Save the GGUF's tokenizer into `folder` once it passes its checks, and only if, read back
    from there, it encodes the probe text exactly as it did before saving; else the problem."""
    from transformers import AutoTokenizer

    from compress.models.tokenizer_check import problem_message, same_encoding

    tok, problem = build_tokenizer(gguf_path)
    if problem:
        return problem
    staged = folder / ".tokenizer"
    try:
        tok.save_pretrained(str(staged))
        problem = same_encoding(AutoTokenizer.from_pretrained(str(staged)), tok)
        if problem:
            return problem_message(f"the tokenizer saved from {gguf_path.name}", problem)
        for p in staged.iterdir():
            os.replace(p, folder / p.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return None


# An https://huggingface.co/<org>/<name> address, as GGUF's general.*.repo_url fields hold one.
_HF_URL = re.compile(r"https?://(?:www\.)?huggingface\.co/([^/?#]+/[^/?#]+)/?")
_UNQUANTIZED = frozenset({"F32", "F16", "BF16", "F64"})


def _hub_id(url) -> str | None:
    match = _HF_URL.fullmatch(url) if isinstance(url, str) else None
    return match.group(1) if match and is_hub_id(match.group(1)) else None


def gguf_metadata(path: Path) -> dict:
    """What a GGUF file says about itself (keys from the GGUF spec's `general.*` section).

    `source_repo` is the Hub repo the file was converted from (general.source.repo_url or the older
    general.source.huggingface.repository); `base_models` are that model's own parents
    (general.base_model.N.repo_url), recorded but not the model this file holds. `file_type` is
    general.file_type's name (e.g. Q4_1), else the commonest tensor type; `bits` is the nominal
    code width it names (Q4_1 -> 4), None when it names none.
    """
    from collections import Counter

    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)

    def field(key: str):
        value = reader.fields.get(key)
        try:
            return value.contents() if value is not None else None
        except Exception:  # a field of a type this gguf version cannot decode: not recorded
            return None

    count = field("general.base_model.count") or 0
    base_models = [_hub_id(field(f"general.base_model.{i}.repo_url")) for i in range(int(count))]
    file_type = field("general.file_type")
    known = {t.value: t.name for t in LlamaFileType if t is not LlamaFileType.GUESSED}
    if file_type in known:
        kind = known[file_type].removeprefix("MOSTLY_").removeprefix("ALL_")
    else:  # no (or an unknown) file type: the type most tensors have
        kind = Counter(t.tensor_type.name for t in reader.tensors).most_common(1)[0][0] if reader.tensors else None
    bits = re.match(r"(?:I?Q|TQ)(\d)", kind or "")
    languages = field("general.languages")
    repo = field("general.source.huggingface.repository")
    return {
        "file": Path(path).name,
        "name": field("general.name"),
        "license": field("general.license"),
        "languages": list(languages) if isinstance(languages, list) and languages else None,
        "source_repo": _hub_id(field("general.source.repo_url")) or (repo if is_hub_id(repo) else None),
        "base_models": [b for b in base_models if b],
        "file_type": kind,
        "quantized": kind is not None and kind not in _UNQUANTIZED,
        "bits": int(bits.group(1)) if bits else None,
    }
