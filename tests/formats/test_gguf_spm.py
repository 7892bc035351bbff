"""GGUF export of a SentencePiece tokenizer (Llama 2 / Mistral v0.1 style) as llama.cpp's
"llama" vocabulary: a tiny SentencePiece BPE model trained here, turned into a Hugging Face
Llama tokenizer folder (with and without tokenizer.model), exported with a tiny Llama; the
file's keys against SentencePiece itself, and transformers' GGUF loader (and llama.cpp, when
installed) tokenizing like the Hugging Face tokenizer."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")

from compress.config import ConfigError, parse_config  # noqa: E402
from compress.evaluate import llamacpp  # noqa: E402
from compress.pipeline import run  # noqa: E402
from tiny_models import corpus, make_model, run_config  # noqa: E402

PIECES = 420  # SentencePiece's vocabulary; the model has 512 rows (tiny_models.VOCAB)
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
PROBES = [  # no added tokens: transformers' GGUF tokenizer reads none but CONTROL ones
    "The river was founded in the north, and the queen became known as the modern king.",
    "Parse 1984 arguments: two  spaces, a\ttab,\nnew lines\n\nand ünïcödé — ✓ 🙂 bytes.",
]
# llama.cpp puts a "▁" before the text after a special or user token, as SentencePiece's legacy
# Llama tokenizer did; the Hugging Face tokenizer does not: the ids are compared up to the first one
ADDED = "A user token [[sep]] and a special one <|im_end|> in text."
# Hugging Face's Metaspace(prepend_scheme="first") adds no "▁" before a text that starts with a
# space; SentencePiece (and llama.cpp) do
LEADING = "  two leading spaces"


def _training_text() -> list[str]:
    """The corpus of the tiny models plus the docstrings of a few standard-library modules:
    punctuation, digits and capitals, shipped with every Python."""
    import argparse
    import collections
    import email
    import logging
    import subprocess
    import typing

    return corpus(120) + [m.__doc__ for m in (argparse, collections, email, logging, subprocess, typing)]


def _train(model_type: str = "bpe") -> bytes:
    """Llama 2's SentencePiece settings: unk/bos/eos = 0/1/2, byte fallback, digits split, no
    normalization and spaces kept as they are, a space prefix."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text()), model_writer=buf, vocab_size=PIECES, model_type=model_type,
        byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A Llama folder whose tokenizer comes from a SentencePiece model (transformers converts
    tokenizer.model to tokenizer.json), with a user token, a special token and a chat template."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("spm-llama")
    (root / "tokenizer.model").write_bytes(_train())
    (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = AutoTokenizer.from_pretrained(str(root), add_bos_token=True, add_eos_token=False,
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_tokens(["[[sep]]"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = TEMPLATE
    make_model("llama", seed=3).save_pretrained(str(root))
    tok.save_pretrained(str(root))  # tokenizer.json, tokenizer_config.json; tokenizer.model stays
    return root


def _export(src: Path, text_file: Path, out: Path) -> Path:
    cfg = parse_config(run_config(src, text_file, out, evaluate={"enabled": False},
                                  quantize={"bits": 8, "group_size": 32}, export={"format": "gguf", "gguf_type": "Q8_0"}))
    (res,) = run(cfg).candidates.values()
    assert res.error is None, res.error
    alone = out / "alone"  # only the GGUF: nothing else in the folder can supply the tokenizer
    alone.mkdir()
    (alone / "model.gguf").symlink_to(res.artifact / "model.gguf")
    return alone


def _folder(spm_model: Path, tmp_path: Path, with_model_file: bool) -> Path:
    src = tmp_path / "src"
    shutil.copytree(spm_model, src)
    if not with_model_file:  # a tokenizer.json alone (most Mistral-style repos ship both)
        (src / "tokenizer.model").unlink()
    return src


@pytest.mark.parametrize("with_model_file", [True, False], ids=["tokenizer.model", "tokenizer.json"])
def test_spm_vocabulary_round_trips_through_transformers(with_model_file, spm_model, text_file, tmp_path):
    from transformers import AutoTokenizer

    src = _folder(spm_model, tmp_path, with_model_file)
    hf = AutoTokenizer.from_pretrained(str(src))
    alone = _export(src, text_file, tmp_path / "out")

    f = {k: v.contents() for k, v in gguf.GGUFReader(str(alone / "model.gguf")).fields.items()
         if k.startswith("tokenizer.")}
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("llama", "default")
    assert "tokenizer.ggml.merges" not in f
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == 512
    T = gguf.TokenType
    assert [tokens[i] for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [types[i] for i in range(3)] == [T.UNKNOWN, T.CONTROL, T.CONTROL]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {T.BYTE}
    assert (tokens[PIECES], types[PIECES]) == ("[[sep]]", T.USER_DEFINED)
    assert (tokens[PIECES + 1], types[PIECES + 1]) == ("<|im_end|>", T.CONTROL)
    assert tokens[-1] == "[PAD511]" and set(types[PIECES + 2 :]) == {T.UNUSED}
    assert set(types[259:PIECES]) == {T.NORMAL}
    assert (f["tokenizer.ggml.unknown_token_id"], f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (0, 1, 2)
    assert f["tokenizer.ggml.add_bos_token"] is True and not f.get("tokenizer.ggml.add_eos_token")  # llama.cpp: off unless set
    assert f["tokenizer.ggml.add_space_prefix"] is True
    assert f["tokenizer.chat_template"] == TEMPLATE
    sp = spm.SentencePieceProcessor(model_file=str(spm_model / "tokenizer.model"))
    assert tokens[:PIECES] == [sp.IdToPiece(i) for i in range(PIECES)]
    assert scores[1:3] == [-1000.0, -1000.0]  # <s>, </s>: added tokens score -1000 in convert_hf_to_gguf
    if with_model_file:  # SentencePiece's own scores
        assert scores[3:PIECES] == pytest.approx([sp.GetScore(i) for i in range(3, PIECES)])
    else:  # from the merge order: a higher score for every earlier merge, as SentencePiece's
        merged = [i for i in range(259, PIECES) if len(tokens[i]) > 1]
        assert sorted(merged, key=lambda i: -scores[i]) == sorted(merged, key=lambda i: -sp.GetScore(i))

    # transformers' GGUF tokenizer does not read add_bos_token (llama.cpp does: the test below),
    # so the texts are compared without BOS
    peer = AutoTokenizer.from_pretrained(str(alone), gguf_file="model.gguf")
    for text in PROBES:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text)  # the folder itself follows SentencePiece
        assert peer(text, add_special_tokens=False)["input_ids"] == ids, text
        assert peer.decode(ids) == hf.decode(ids)


@pytest.mark.ecosystem
@pytest.mark.parametrize("with_model_file", [True, False], ids=["tokenizer.model", "tokenizer.json"])
def test_llama_cpp_tokenizes_like_the_hugging_face_tokenizer(with_model_file, spm_model, text_file, tmp_path):
    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed (bash scripts/build-llamacpp.sh)")
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    src = _folder(spm_model, tmp_path, with_model_file)
    hf = AutoTokenizer.from_pretrained(str(src))
    alone = _export(src, text_file, tmp_path / "out")
    llm = Llama(model_path=str(alone / "model.gguf"), vocab_only=True, verbose=False)
    try:
        for text in PROBES:
            assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == hf(text)["input_ids"], text
        ours, theirs = llm.tokenize(ADDED.encode("utf-8"), add_bos=True, special=True), hf(ADDED)["input_ids"]
        cut = theirs.index(PIECES) + 1
        assert ours[:cut] == theirs[:cut] and PIECES + 1 in ours  # [[sep]] and <|im_end|> matched whole
        sp = spm.SentencePieceProcessor(model_file=str(spm_model / "tokenizer.model"))
        assert llm.tokenize(LEADING.encode("utf-8"), add_bos=False) == sp.encode(LEADING)
    finally:
        llm.close()


def test_a_unigram_sentencepiece_model_stops_before_quantizing(spm_model, text_file, tmp_path):
    """llama.cpp's "llama" tokenizer merges by score, which a Unigram model does not: the run
    stops at load, naming the file, and writes nothing."""
    src = _folder(spm_model, tmp_path, True)
    (src / "tokenizer.model").write_bytes(_train("unigram"))
    cfg = parse_config(run_config(src, text_file, tmp_path / "out", quantize={"bits": 8, "group_size": 32},
                                  export={"format": "gguf", "gguf_type": "Q8_0"}, evaluate={"enabled": False}))
    with pytest.raises(ConfigError, match=r"export\.format: gguf: .*tokenizer\.model: a SentencePiece UNIGRAM model"):
        run(cfg)
    assert not list((tmp_path / "out").glob("*/model.gguf"))
