"""A GGUF file's own tokenizer description (`tokenizer.ggml.*`, GGUF spec) and a tokenizer built
from it where transformers' own conversion is known to be wrong.

transformers (5.x) turns Gemma 2/3 GGUF vocabularies into a Unigram model fed with the GGUF
scores, but those vocabularies are SentencePiece *BPE* (`tokenizer.ggml.model: llama`, scores =
minus the merge rank): Viterbi over rank-scores prefers many short pieces, so `" history"`
becomes `▁h ist ory` although the vocabulary holds `▁history`. `spm_tokenizer` rebuilds the
tokenizer as llama.cpp reads such a vocabulary (llm_tokenizer_spm: repeatedly merge the adjacent
pair whose concatenation is a token with the highest score; bytes of unknown characters fall back
to `<0xXX>` tokens; user-defined tokens are matched whole in the raw text first).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPM_MODELS = ("llama", "gemma")  # SentencePiece vocabularies: words carry a leading "▁"
BPE_MODELS = ("gpt2",)  # byte-level BPE: a leading space is spelled "Ġ"


@dataclass(frozen=True)
class GGUFVocab:
    model: str  # tokenizer.ggml.model: llama (SentencePiece), gpt2 (byte-level BPE), ...
    tokens: list[str]
    scores: Optional[list[float]]
    types: Optional[list[int]]
    merges: Optional[list[str]]
    bos_id: Optional[int]
    eos_id: Optional[int]
    unk_id: Optional[int]
    pad_id: Optional[int]
    add_bos: Optional[bool]  # None: the file does not say
    add_eos: bool
    add_space_prefix: bool
    chat_template: Optional[str]

    def word_token(self, word: str) -> Optional[str]:
        """How the vocabulary spells `word` preceded by a space, or None for other models."""
        if self.model in SPM_MODELS:
            return "▁" + word
        if self.model in BPE_MODELS:
            return "Ġ" + word  # GPT-2's bytes_to_unicode maps the space byte to "Ġ"
        return None


def read_vocab(path: Path) -> Optional[GGUFVocab]:
    """The `tokenizer.ggml.*` fields of a GGUF file; None when it has no vocabulary."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def get(key: str, default=None):
        f = fields.get(f"tokenizer.ggml.{key}") if not key.startswith("tokenizer.") else fields.get(key)
        return default if f is None else f.contents()

    tokens = get("tokens")
    if not tokens:
        return None
    return GGUFVocab(
        model=get("model", "?"), tokens=tokens, scores=get("scores"), types=get("token_type"),
        merges=get("merges"), bos_id=get("bos_token_id"), eos_id=get("eos_token_id"),
        unk_id=get("unknown_token_id"), pad_id=get("padding_token_id"), add_bos=get("add_bos_token"),
        add_eos=bool(get("add_eos_token", False)), add_space_prefix=bool(get("add_space_prefix", False)),
        chat_template=get("tokenizer.chat_template"),
    )


def _merges(v: GGUFVocab) -> list[tuple[str, str]]:
    """Every split (left, right) of a token into two tokens, highest-scoring merged token first:
    BPE's merge ranks for llama.cpp's SPM rule "merge the best-scoring adjacent pair"."""
    index = {t: i for i, t in enumerate(v.tokens)}
    found = []
    for i, t in enumerate(v.tokens):
        if v.types and v.types[i] in (CONTROL, BYTE, UNKNOWN, UNUSED):
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in index and right in index:
                found.append((-v.scores[i], i, k, left, right))
    found.sort()  # score descending; ties by token id then split point, as a stable order
    return [(left, right) for _, _, _, left, right in found]


def spm_tokenizer(v: GGUFVocab):
    """A `PreTrainedTokenizerFast` for a SentencePiece-BPE GGUF vocabulary (tokenizer.ggml.model
    llama/gemma with scores), adding BOS/EOS as the file's add_bos_token/add_eos_token say."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    if v.model not in SPM_MODELS or not v.scores:
        raise ValueError(f"not a SentencePiece vocabulary with scores (tokenizer.ggml.model {v.model!r})")
    name = (lambda i: v.tokens[i] if i is not None and 0 <= i < len(v.tokens) else None)
    vocab = {t: i for i, t in enumerate(v.tokens)}
    tok = Tokenizer(BPE(vocab, _merges(v), unk_token=name(v.unk_id), fuse_unk=True, byte_fallback=True))
    norm = [normalizers.Replace(" ", "▁")]
    if v.add_space_prefix:
        norm.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if v.add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    types = v.types or [NORMAL] * len(v.tokens)
    # Control tokens (<bos>, <start_of_turn>) are special; user-defined ones (newline and space
    # runs, HTML tags) are matched whole in the raw text, as llama.cpp partitions text on them.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(v.tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(v.tokens, types) if ty == USER_DEFINED])
    bos, eos = name(v.bos_id), name(v.eos_id)
    single, special = "$A", []
    if v.add_bos and bos:
        single, special = f"{bos} {single}", [(bos, v.bos_id)]
    if v.add_eos and eos:
        single, special = f"{single} {eos}", special + [(eos, v.eos_id)]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=name(v.unk_id), pad_token=name(v.pad_id),
    )
    if v.chat_template:
        fast.chat_template = v.chat_template
    return fast


def ensure_bos(tok, v: GGUFVocab):
    """`tok` made to start every text with the GGUF's BOS where tokenizer.ggml.add_bos_token says
    so and it does not already (transformers' GGUF conversions do not always read that field)."""
    from tokenizers import processors

    if not v.add_bos or v.bos_id is None or tok("a")["input_ids"][:1] == [v.bos_id]:
        return tok
    bos = v.tokens[v.bos_id]
    template = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, v.bos_id)])
    backend = tok.backend_tokenizer
    backend.post_processor = template if backend.post_processor is None else processors.Sequence([backend.post_processor, template])
    tok.bos_token = bos
    return tok
