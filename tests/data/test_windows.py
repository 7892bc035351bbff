import hashlib

import numpy as np
import pytest
import torch

from compress.data import (
    calibration_windows, evaluation_windows, resolve_source, split_of, windows_sha256,
)
from compress.data.windows import as_chat, calibration_draw


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A .txt source of 60 short documents: enough text for a few windows in each split."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    docs = [f"Document {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs." for i in range(60)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return resolve_source(str(path)), docs


def _reference_stream(tokenizer, texts):
    # Independent of windows.py: encode each document, join with the ids of "\n\n".
    sep = tokenizer.encode("\n\n", add_special_tokens=False)
    out = []
    for i, text in enumerate(texts):
        if i:
            out.extend(sep)
        out.extend(tokenizer.encode(text, add_special_tokens=False))
    return out


def _contains(stream, window):
    n = len(window)
    return any(stream[i : i + n] == window for i in range(len(stream) - n + 1))


def test_same_seed_same_windows_and_hash(tokenizer, corpus):
    source, _ = corpus
    a = calibration_windows(tokenizer, source, nsamples=6, seqlen=16, seed=3)
    b = calibration_windows(tokenizer, source, nsamples=6, seqlen=16, seed=3)
    c = calibration_windows(tokenizer, source, nsamples=6, seqlen=16, seed=4)
    assert a.dtype == torch.int64 and a.shape == (6, 16)
    assert torch.equal(a, b) and windows_sha256(a) == windows_sha256(b)
    assert not torch.equal(a, c) and windows_sha256(a) != windows_sha256(c)


def test_global_rng_untouched(tokenizer, corpus):
    source, _ = corpus
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    calibration_windows(tokenizer, source, nsamples=4, seqlen=8, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_calibration_windows_come_from_calibration_split_only(tokenizer, corpus):
    source, docs = corpus
    cal = [d for d in docs if split_of(d, source.eval_fraction) == "calibration"]
    ev = [d for d in docs if split_of(d, source.eval_fraction) == "evaluation"]
    assert cal and ev
    cal_stream = _reference_stream(tokenizer, cal)
    ev_stream = _reference_stream(tokenizer, ev)
    windows = calibration_windows(tokenizer, source, nsamples=8, seqlen=24, seed=0)
    for w in windows.tolist():
        assert _contains(cal_stream, w)
        assert not _contains(ev_stream, w)


def test_split_all_draws_from_every_document_and_counts_them(tokenizer, corpus):
    source, docs = corpus
    ev = [d for d in docs if split_of(d, source.eval_fraction) == "evaluation"]
    whole = _reference_stream(tokenizer, docs)
    drawn = calibration_draw(tokenizer, source, nsamples=200, seqlen=12, seed=0, split="all")
    assert drawn.documents == len(docs)
    assert drawn.tokens == sum(len(tokenizer.encode(d, add_special_tokens=False)) for d in docs)
    assert all(_contains(whole, w) for w in drawn.windows.tolist())
    # 200 draws over the whole file reach the evaluation share too (held out by default)
    ev_stream = _reference_stream(tokenizer, ev)
    assert any(_contains(ev_stream, w) for w in drawn.windows.tolist())


def test_held_out_draw_counts_the_calibration_share(tokenizer, corpus):
    source, docs = corpus
    cal = [d for d in docs if split_of(d, source.eval_fraction) == "calibration"]
    drawn = calibration_draw(tokenizer, source, nsamples=4, seqlen=12, seed=0)
    assert (drawn.documents, drawn.tokens) == (
        len(cal), sum(len(tokenizer.encode(d, add_special_tokens=False)) for d in cal))
    assert torch.equal(drawn.windows, calibration_windows(tokenizer, source, nsamples=4, seqlen=12, seed=0))


def test_evaluation_windows_are_consecutive_from_the_start(tokenizer, corpus):
    source, docs = corpus
    ev = [d for d in docs if split_of(d, source.eval_fraction) == "evaluation"]
    stream = _reference_stream(tokenizer, ev)
    seqlen = 10
    n = len(stream) // seqlen
    windows = evaluation_windows(tokenizer, source, n_windows=n, seqlen=seqlen)
    assert windows.shape == (n, seqlen)
    assert windows.flatten().tolist() == stream[: n * seqlen]
    first = evaluation_windows(tokenizer, source, n_windows=2, seqlen=seqlen)
    assert torch.equal(first, windows[:2])


def test_not_enough_evaluation_text_names_the_keys(tokenizer, corpus):
    source, _ = corpus
    with pytest.raises(ValueError, match=r"evaluate\.windows=1000 x evaluate\.seqlen=64 needs 64000"):
        evaluation_windows(tokenizer, source, n_windows=1000, seqlen=64)
    with pytest.raises(ValueError, match=r"calibration\.seqlen=100000"):
        calibration_windows(tokenizer, source, nsamples=1, seqlen=100_000, seed=0)
    with pytest.raises(ValueError, match=r"calibration\.nsamples must be a positive integer"):
        calibration_windows(tokenizer, source, nsamples=0, seqlen=8, seed=0)


def test_sha256_is_int64_little_endian(tokenizer):
    w = torch.tensor([[1, 2, 300], [4, 5, 70000]], dtype=torch.int32)
    expected = hashlib.sha256(np.array([1, 2, 300, 4, 5, 70000], dtype="<i8").tobytes()).hexdigest()
    assert windows_sha256(w) == expected == windows_sha256(w.to(torch.int64))


def test_random_tokens(tokenizer):
    a = calibration_windows(tokenizer, "random-tokens", nsamples=4, seqlen=32, seed=7)
    b = calibration_windows(tokenizer, "random-tokens", nsamples=4, seqlen=32, seed=7)
    c = calibration_windows(tokenizer, "random-tokens", nsamples=4, seqlen=32, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and 0 <= a.min() and a.max() < tokenizer.vocab_size
    ev = evaluation_windows(tokenizer, "random-tokens", n_windows=2, seqlen=32)
    assert torch.equal(ev, evaluation_windows(tokenizer, "random-tokens", n_windows=2, seqlen=32))


def test_chat_template_wraps_each_document(chat_tokenizer, corpus):
    source, docs = corpus
    windows = calibration_windows(chat_tokenizer, source, nsamples=40, seqlen=12, seed=0, chat_template=True)
    cal = [d for d in docs if split_of(d, source.eval_fraction) == "calibration"]
    wrapped = [
        chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": "Write a passage of text."}, {"role": "assistant", "content": d}],
            tokenize=False,
        )
        for d in cal
    ]
    stream = _reference_stream(chat_tokenizer, wrapped)
    plain = _reference_stream(chat_tokenizer, cal)
    assert all(_contains(stream, w) for w in windows.tolist())
    assert not all(_contains(plain, w) for w in windows.tolist())


def test_as_chat_splits_first_paragraph(chat_tokenizer):
    text = as_chat(chat_tokenizer, "Question here.\n\nAnswer one.\n\nAnswer two.")
    assert text == "<|user|>Question here.</s>\n<|assistant|>Answer one.\n\nAnswer two.</s>\n"


def test_chat_template_absent_is_an_error(tokenizer, corpus):
    source, _ = corpus
    with pytest.raises(ValueError, match="calibration.chat_template is true but the tokenizer has no chat template"):
        calibration_windows(tokenizer, source, nsamples=1, seqlen=8, seed=0, chat_template=True)


def test_shakespeare_windows_decode_to_spoken_text(tokenizer):
    windows = evaluation_windows(tokenizer, "shakespeare", n_windows=2, seqlen=64)
    text = tokenizer.decode(windows[0])
    assert ":" in text and "_" not in text and "#" not in text
