"""Tokenizer fidelity checks: a wrong tokenizer makes every number of a run noise, silently.

Each check returns a one-line problem (None when it passes); callers turn it into an error
that names the fix, `model.tokenizer: PATH-or-hub-id` (see `problem_message`).
"""
from __future__ import annotations

from typing import Optional

from compress.models.gguf_vocab import GGUFVocab

# Plain English with digits and punctuation: every tokenizer of a supported family decodes it
# back exactly, and its common words are single tokens in any real vocabulary.
PROBE = (
    "The history of the city began in the early years of the second century, when the river was "
    "used for trade. Its people built houses of stone and wood, and the market grew around the old "
    "church. In 1850 the population was 12,400; today it is a small town known for its music."
)
_FIX = "set model.tokenizer: PATH-or-hub-id to the model's own tokenizer (a folder or a Hugging Face repo)"


def problem_message(what: str, problem: str) -> str:
    """The one line a failed check is reported as (exit 2)."""
    return f"model.tokenizer: {what} {problem}; {_FIX}"


def _probe_words() -> list[str]:
    # Words preceded by a space (the first word of a text has no leading space to carry).
    words = [w.strip(".,;:") for w in PROBE.split()[1:]]
    return list(dict.fromkeys(w for w in words if w.isalpha()))


def encode(tok, text: str = PROBE, special: bool = False) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def round_trip(tok) -> Optional[str]:
    """decode(encode(PROBE)) must give PROBE back."""
    back = tok.decode(encode(tok), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if back != PROBE:
        at = next((i for i, (a, b) in enumerate(zip(back, PROBE)) if a != b), min(len(back), len(PROBE)))
        return f"does not decode its own encoding back to the text (first difference at character {at}: {back[at:at + 20]!r} for {PROBE[at:at + 20]!r})"
    return None


def same_encoding(saved, original) -> Optional[str]:
    """The tokenizer as saved (and reloaded) must encode PROBE to the same ids as the one it came
    from, special tokens included (a lost BOS is a difference too)."""
    a, b = encode(saved, special=True), encode(original, special=True)
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return (
            f"encodes differently once saved: {len(a)} tokens instead of {len(b)}, first difference at "
            f"token {at} ({saved.convert_ids_to_tokens(a[at:at + 4])} for {original.convert_ids_to_tokens(b[at:at + 4])})"
        )
    return None


def against_gguf(tok, vocab: GGUFVocab) -> Optional[str]:
    """The tokenizer must read the GGUF's vocabulary as llama.cpp does. Checked on the probe's
    words: where the vocabulary holds " word" as one token (`▁history` for SentencePiece,
    `Ġhistory` for byte-level BPE), the tokenizer must produce that token, with that id. This
    catches a tokenizer that spells text character by character, one that prefers short pieces
    (a Unigram model read from BPE scores), and ids shifted against the GGUF's embedding rows.
    Where the file says BOS is added, the tokenizer must add it."""
    ids = set(encode(tok))
    index = {t: i for i, t in enumerate(vocab.tokens)}
    held = [(w, index[s]) for w in _probe_words() if (s := vocab.word_token(w)) is not None and s in index]
    for word, want in held:
        if want not in ids:
            pieces = tok.convert_ids_to_tokens(encode(tok, " " + word))
            return (
                f"splits {word!r} into {pieces} although the GGUF vocabulary ({vocab.model}) holds "
                f"{vocab.tokens[want]!r} as token {want}"
            )
    if vocab.add_bos and vocab.bos_id is not None and encode(tok, special=True)[:1] != [vocab.bos_id]:
        return f"does not start a text with BOS (token {vocab.bos_id}) as the GGUF's tokenizer.ggml.add_bos_token says"
    return None


def adds_bos(tok) -> Optional[int]:
    """The BOS id when the tokenizer puts it first by default (Llama 3, Gemma), else None."""
    bos = getattr(tok, "bos_token_id", None)
    ids = tok("a")["input_ids"]
    return bos if bos is not None and ids[:1] == [bos] else None
