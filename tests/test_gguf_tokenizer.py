"""The tokenizer built from a SentencePiece-BPE GGUF vocabulary, against an independent slow
implementation of llama.cpp's rule (llm_tokenizer_spm), and the checks that catch the two ways
transformers' GGUF tokenizers went wrong on Gemma 3 (character splitting; a Unigram model read
from BPE scores)."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from compress.models.gguf_vocab import BYTE, CONTROL, NORMAL, UNKNOWN, GGUFVocab, ensure_bos, spm_tokenizer
from compress.models.tokenizer_check import PROBE, against_gguf, round_trip, same_encoding

_SPECIALS = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN)]
_DISTRACTORS = ["ist", "ory", "is", "st", "or", "ry", "he", "an", "in"]  # rank before the words


def probe_vocab(add_bos: bool = True) -> GGUFVocab:
    """A Gemma-shaped vocabulary: specials, 256 byte tokens, the probe's characters, short pieces
    ranked first, then every prefix of every "▁word" of the probe, shorter first (so BPE reaches
    whole words); scores are minus the rank, as in Gemma's GGUF."""
    text = PROBE.replace(" ", "▁")
    tokens = [t for t, _ in _SPECIALS] + [f"<0x{b:02X}>" for b in range(256)]
    types = [ty for _, ty in _SPECIALS] + [BYTE] * 256
    prefixes = []
    for word in PROBE.split()[1:]:
        w = "▁" + word.strip(".,;:")
        prefixes += [w[:k] for k in range(2, len(w) + 1)]
    # Longer pieces rank later, as in a trained BPE vocabulary (whole words are rarer merges).
    pieces = sorted(set(text)) + _DISTRACTORS + sorted(dict.fromkeys(prefixes), key=len)
    for p in dict.fromkeys(pieces):
        if p not in tokens:
            tokens.append(p)
            types.append(NORMAL)
    scores = [-1000.0] * 4 + [0.0] * 256 + [-float(i) for i in range(len(tokens) - 260)]
    return GGUFVocab("llama", tokens, scores, types, None, 2, 1, 3, 0, add_bos, False, False, None)


def reference_spm(v: GGUFVocab, text: str) -> list[int]:
    """llama.cpp's SentencePiece rule, slowly: spaces become "▁"; start from characters; merge
    the adjacent pair whose concatenation is a token with the highest score (leftmost first)
    until none is; characters that are no token become their UTF-8 byte tokens."""
    index = {t: i for i, t in enumerate(v.tokens)}
    mergeable = {t for i, t in enumerate(v.tokens) if v.types[i] == NORMAL}
    symbols = list(text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            joined = symbols[i] + symbols[i + 1]
            if joined in mergeable and (best is None or v.scores[index[joined]] > v.scores[index[best[1]]]):
                best = (i, joined)
        if best is None:
            break
        i, joined = best
        symbols[i : i + 2] = [joined]
    ids = []
    for s in symbols:
        ids += [index[s]] if s in index else [index[f"<0x{b:02X}>"] for b in s.encode()]
    return ([v.bos_id] if v.add_bos else []) + ids


def test_spm_tokenizer_matches_llama_cpps_rule():
    v = probe_vocab()
    tok = spm_tokenizer(v)
    for text in (PROBE, "The history of stone", "old town, naïve café", "history historyhistory"):
        assert tok(text)["input_ids"] == reference_spm(v, text), text
    ids = tok(PROBE)["input_ids"]
    assert [v.tokens[i] for i in ids[:4]] == ["<bos>", "T", "he", "▁history"]
    assert tok.decode(ids, skip_special_tokens=True) == PROBE
    assert against_gguf(tok, v) is None and round_trip(tok) is None


def test_saved_and_reloaded_tokenizer_encodes_the_same(tmp_path):
    from transformers import AutoTokenizer

    tok = spm_tokenizer(probe_vocab())
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert same_encoding(again, tok) is None
    assert again(PROBE)["input_ids"] == tok(PROBE)["input_ids"]


def _wrap(model, v: GGUFVocab) -> PreTrainedTokenizerFast:
    t = Tokenizer(model)
    t.normalizer = normalizers.Replace(" ", "▁")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", unk_token="<unk>")


def test_a_unigram_model_over_bpe_scores_is_caught():
    # What transformers' GGUF converter builds for Gemma: Viterbi over rank-scores prefers pieces.
    v = probe_vocab()
    unigram = _wrap(models.Unigram([(t, s) for t, s in zip(v.tokens, v.scores)], unk_id=3, byte_fallback=True), v)
    assert unigram.convert_ids_to_tokens(unigram(" history", add_special_tokens=False)["input_ids"]) == ["▁h", "ist", "ory"]
    problem = against_gguf(unigram, v)
    assert problem.startswith("splits 'history' into ['▁h', 'ist', 'ory']") and "'▁history' as token" in problem


def test_character_splitting_is_caught():
    # What the converted folder held for Gemma 3: one token per character.
    v = probe_vocab()
    chars = _wrap(models.BPE({t: i for i, t in enumerate(v.tokens)}, [], unk_token="<unk>", byte_fallback=True), v)
    assert round_trip(chars) is None  # a round trip alone cannot see it
    problem = against_gguf(chars, v)
    assert problem.startswith("splits 'history' into ['▁', 'h', 'i', 's', 't', 'o', 'r', 'y']")


def test_a_missing_bos_is_caught_where_the_gguf_adds_one():
    with_bos, without = probe_vocab(add_bos=True), probe_vocab(add_bos=False)
    tok = spm_tokenizer(without)
    assert tok(PROBE)["input_ids"][0] != 2 and against_gguf(tok, without) is None
    assert "does not start a text with BOS (token 2)" in against_gguf(tok, with_bos)
    # What conversion does with such a tokenizer: BOS is added as the file says, nothing else changes.
    fixed = ensure_bos(tok, with_bos)
    assert fixed(PROBE)["input_ids"] == [2] + spm_tokenizer(without)(PROBE)["input_ids"]
    assert against_gguf(fixed, with_bos) is None
