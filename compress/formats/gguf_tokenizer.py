"""The `tokenizer.ggml.*` keys of a GGUF file, from a Hugging Face model folder, as llama.cpp's
convert_hf_to_gguf.py writes them:

- a byte-level BPE tokenizer.json as llama.cpp's BPE tokenizer (`model "gpt2"`, with merges and
  a pre-tokenizer name), its `_set_vocab_gpt2`;
- a SentencePiece BPE tokenizer (Llama 2, Mistral v0.1, Gemma: `tokenizer.model`, or a
  tokenizer.json BPE with byte fallback over "▁"-joined words) as llama.cpp's SentencePiece
  tokenizer (`model "llama"`, with per-token scores), its `_set_vocab_sentencepiece`;
- a source converted from GGUF: the original file's fields, as they were.

Both keep the embedding's row count: ids past the tokenizer are `[PADn]`, type UNUSED.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

# gguf.TokenType, spelled here so that the checks below need no gguf import
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's "▁": a space inside a piece
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class SpmVocab:
    """A SentencePiece vocabulary as llama.cpp's "llama" tokenizer holds it: piece i with its
    score (llama.cpp merges the adjacent pair whose joined piece scores highest) and type."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool  # SentencePiece's add_dummy_prefix: "▁" before the text


# ---- which tokenizer a folder holds ---------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _has_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def _is_spm_json(tok: dict[str, Any]) -> bool:
    """A tokenizer.json converted from SentencePiece BPE: byte fallback, and words joined by "▁"
    (a Metaspace pre-tokenizer, or a normalizer that replaces " " with "▁")."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    text = json.dumps([tok.get("pre_tokenizer"), tok.get("normalizer")], ensure_ascii=False)
    return '"Metaspace"' in text or f'"content": "{SPACE}"' in text


def _spm_model_type(path: Path) -> str:
    """The trainer's model type stored in tokenizer.model ("BPE", "UNIGRAM", ...)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)


def tokenizer_kind(root: Path) -> tuple[str, Optional[str]]:
    """("gguf" | "spm-model" | "spm-json" | "bpe", None), or (None, why it cannot be written).

    tokenizer.model comes first, as in convert_hf_to_gguf (its scores are SentencePiece's own);
    without the `sentencepiece` package an SPM-style tokenizer.json stands in."""
    if _source_gguf(root) is not None:
        return "gguf", None
    spm_file, json_file = root / "tokenizer.model", root / "tokenizer.json"
    tok = _read_json(json_file)
    model = tok.get("model") or {}
    unigram = ("llama.cpp's SentencePiece tokenizer ('llama') merges pieces by score; a Unigram model picks "
               "the most likely segmentation, so llama.cpp would split text differently")
    if spm_file.is_file() and _has_sentencepiece():
        kind = _spm_model_type(spm_file)
        if kind != "BPE":
            return None, f"{spm_file}: a SentencePiece {kind} model is not written to GGUF: {unigram}"
        return "spm-model", None
    if not tok:
        if spm_file.is_file():
            return None, (f"{spm_file}: reading it needs the sentencepiece package "
                          "(pip install 'compress[gguf]'), and there is no tokenizer.json")
        return None, f"{root}: no tokenizer.json or tokenizer.model to write the GGUF vocabulary from"
    if model.get("type") == "Unigram":
        return None, f"{json_file}: a Unigram tokenizer is not written to GGUF: {unigram}"
    if _is_spm_json(tok):
        return "spm-json", None
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        return "bpe", None
    return None, (f"{json_file}: model {model.get('type')} with byte_fallback {model.get('byte_fallback')} is "
                  "neither byte-level BPE nor SentencePiece BPE (words joined by '▁'); GGUF export writes those two, "
                  "and a GGUF source carries its own vocabulary over")


def tokenizer_problem(root: Path) -> Optional[str]:
    """Why the vocabulary of the model folder `root` cannot be written (None when it can)."""
    return tokenizer_kind(root)[1]


# ---- writing -----------------------------------------------------------------------------------
def add_tokenizer(w, root: Path, config) -> None:
    """Write the vocabulary of `root` for a model with `config.vocab_size` embedding rows."""
    kind, problem = tokenizer_kind(root)
    if problem:
        raise ValueError(problem)
    if kind == "gguf":
        _copy_tokenizer_fields(w, _source_gguf(root))
    elif kind == "bpe":
        _add_bpe(w, root, config)
    else:
        vocab = _spm_from_model(root, config.vocab_size) if kind == "spm-model" else _spm_from_json(root, config.vocab_size)
        _add_spm(w, root, vocab)


def _add_spm(w, root: Path, vocab: SpmVocab) -> None:
    """convert_hf_to_gguf's _set_vocab_sentencepiece: model "llama", pre "default", tokens,
    scores, types, then the special ids, add_bos/add_eos and chat template (SpecialVocab)."""
    import gguf

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    # llama.cpp assumes a space prefix for "llama" unless told; Gemma's models have none
    w.add_add_space_prefix(vocab.add_space_prefix)
    gguf.SpecialVocab(root, load_merges=False, n_vocab=len(vocab.tokens)).add_to_gguf(w, quiet=True)


def _padded(n: int) -> tuple[list[str], list[float], list[int]]:
    return [f"[PAD{i}]" for i in range(n)], [-10000.0] * n, [UNUSED] * n


def _spm_from_model(root: Path, n: int) -> SpmVocab:
    """convert_hf_to_gguf's _create_vocab_sentencepiece: every piece of tokenizer.model with its
    score and type, then the added tokens over them. One difference: a piece SentencePiece marks
    user-defined is written USER_DEFINED (llama.cpp's converter writes NORMAL), since both
    SentencePiece and llama.cpp match such pieces whole before splitting."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = root / "tokenizer.model"
    sp = SentencePieceProcessor(model_file=str(path))
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    tokens, scores, types = _padded(n)
    for i in range(sp.vocab_size()):
        if i >= n:
            log.warning("GGUF export: %s has %d pieces, the embedding %d rows; pieces from %d are dropped",
                        path, sp.vocab_size(), n, i)
            break
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i)
                    else USER_DEFINED if proto.pieces[i].type == pb.ModelProto.SentencePiece.USER_DEFINED
                    else NORMAL)
    for text, tid in _read_json(root / "added_tokens.json").items():
        if tid < n:
            tokens[tid], scores[tid], types[tid] = text, -1000.0, USER_DEFINED
    _apply_added_tokens(root, tokens, scores, types)
    return SpmVocab(tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix))


def _spm_from_json(root: Path, n: int) -> SpmVocab:
    """The same vocabulary read from a SentencePiece-BPE tokenizer.json, which keeps no scores:
    a piece made by merge r scores -r, so llama.cpp's highest-score-first merging applies the
    merges in the tokenizer's order; pieces no merge makes (characters, bytes, specials) score 0,
    as SentencePiece gives its byte and control pieces."""
    path = root / "tokenizer.json"
    tok = _read_json(path)
    model = tok["model"]
    tokens, scores, types = _padded(n)
    made: dict[str, int] = {}
    for r, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        made.setdefault(a + b, r)
    unk = model.get("unk_token") or _read_json(root / "tokenizer_config.json").get("unk_token")
    unk = unk.get("content") if isinstance(unk, dict) else unk
    for piece, i in model["vocab"].items():
        if i >= n:
            raise ValueError(f"{path}: token {piece!r} has id {i}, beyond the model's {n} embedding rows")
        tokens[i] = piece
        scores[i] = -float(made[piece]) if piece in made else 0.0
        types[i] = UNKNOWN if piece == unk else BYTE if _BYTE_PIECE.fullmatch(piece) else NORMAL
    _apply_added_tokens(root, tokens, scores, types)
    return SpmVocab(tokens, scores, types, _json_space_prefix(tok))


def _json_space_prefix(tok: dict[str, Any]) -> bool:
    """Whether the tokenizer.json puts "▁" before the text: a Metaspace pre-tokenizer whose
    prepend_scheme is not "never", or a normalizer that prepends "▁" (Llama 2's)."""
    def walk(node):
        if isinstance(node, dict):
            yield node
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    for part in walk([tok.get("normalizer"), tok.get("pre_tokenizer")]):
        if part.get("type") == "Prepend" and part.get("prepend") == SPACE:
            return True
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") != "never" and bool(part.get("add_prefix_space", True))
    return False


def _apply_added_tokens(root: Path, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """The added tokens of tokenizer_config.json (added_tokens_decoder) and tokenizer.json
    (added_tokens, where transformers 5 keeps them) over the pieces, as convert_hf_to_gguf does:
    special ones (or ones that look it, `<|...|>`, `<unused..>`) CONTROL, the rest USER_DEFINED
    with "▁" written as a space, all scoring -1000. The unknown piece, which Hugging Face lists
    among its special added tokens, stays UNKNOWN (convert_hf_to_gguf makes it CONTROL)."""
    cfg = _read_json(root / "tokenizer_config.json").get("added_tokens_decoder", {})
    added = [(int(i), a["content"], bool(a.get("special"))) for i, a in cfg.items()]
    added += [(a["id"], a["content"], bool(a.get("special"))) for a in _read_json(root / "tokenizer.json").get("added_tokens", [])]
    for i, text, special in added:
        if i >= len(tokens):
            log.warning("GGUF export: added token %r has id %d, beyond the %d embedding rows; not written",
                        text, i, len(tokens))
            continue
        if types[i] == UNKNOWN and tokens[i] == text:
            continue
        if special or _looks_special(text):
            types[i] = CONTROL
        else:
            text, types[i] = text.replace(SPACE, " "), USER_DEFINED
        tokens[i], scores[i] = text, -1000.0


def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: added tokens some models leave unmarked."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


# ---- byte-level BPE ----------------------------------------------------------------------------
def _pre_tokenizer(tok: dict[str, Any], model_type: str) -> str:
    """llama.cpp's `tokenizer.ggml.pre` (which split regex to use). convert_hf_to_gguf finds it by
    hashing a test string's tokens against its table; we read the pre-tokenizer's structure."""
    if model_type in ("qwen2", "qwen3"):
        return "qwen2"
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    text = json.dumps(pre)
    if "Split" in kinds and "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM's (and StarCoder's): single digits, then GPT-2's regex
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's spelling (llama-vocab.cpp); "gpt2" fails to load there
    log.warning("GGUF export: pre-tokenizer %s not recognised; writing tokenizer.ggml.pre 'default'", kinds)
    return "default"


def _add_bpe(w, root: Path, config) -> None:
    """The vocabulary as llama.cpp's BPE ("gpt2") tokenizer: tokens padded to the embedding's
    rows with [PADn] (type UNUSED), token types, merges, special ids and chat template
    (gguf-py's SpecialVocab)."""
    import gguf

    path = root / "tokenizer.json"
    tok = _read_json(path)
    model = tok["model"]
    n = config.vocab_size
    tokens, _, types = _padded(n)
    entries = [(t, i, NORMAL) for t, i in model["vocab"].items()]
    entries += [(a["content"], a["id"], CONTROL if a.get("special") else USER_DEFINED)
                for a in tok.get("added_tokens", [])]
    for t, i, kind in entries:
        if i >= n:
            raise ValueError(f"{path}: token {t!r} has id {i}, beyond the model's {n} embedding rows")
        tokens[i], types[i] = t, kind
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tok, config.model_type))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    gguf.SpecialVocab(root, load_merges=False, n_vocab=n).add_to_gguf(w, quiet=True)


# ---- a source converted from GGUF ------------------------------------------------------------
def _source_gguf(root: Path) -> Optional[Path]:
    from compress.models.provenance import CONVERTED_FROM

    marker = root / CONVERTED_FROM
    if not marker.is_file():
        return None
    path = Path(marker.read_text(encoding="utf-8").splitlines()[0])
    return path if path.is_file() else None


def _copy_tokenizer_fields(w, path: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
