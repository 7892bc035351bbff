"""Token windows for calibration (random, seeded) and evaluation (consecutive, non-overlapping).

Each document is tokenized on its own, without special tokens, and the documents' ids are joined
with the ids of "\\n\\n" (model-agnostic, and the separator of the usual perplexity protocol).
With `bos_id`, every window is that token followed by `seqlen - 1` tokens of text: a model
trained with BOS first (Gemma, Llama 3) is read as it was trained, and as llama.cpp's perplexity
reads it; the window keeps its length.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Optional, Union

import torch

from compress.data.sources import Document, TextSource, iter_documents, resolve_source
from compress.data.splits import split_documents

SourceSpec = Union[str, TextSource]
SEPARATOR = "\n\n"
_BATCH_DOCS = 32
# `random-tokens` evaluation windows come from their own fixed stream, apart from calibration's.
_RANDOM_EVAL_SEED = 0x5EED_E7A1


CalibrationSplit = Literal["calibration", "all"]


@dataclass(frozen=True)
class CalibrationDraw:
    """The calibration windows and what they were drawn from: `documents` and `tokens` (each
    document tokenized on its own, separators not counted) of the text the offsets range over."""

    windows: torch.Tensor
    documents: int
    tokens: int


def calibration_windows(
    tokenizer, source_spec: SourceSpec, nsamples: int, seqlen: int, seed: int,
    chat_template: bool = False, split: CalibrationSplit = "calibration", bos_id: Optional[int] = None,
) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens, each starting at a uniformly drawn offset (with
    replacement) in the concatenated calibration split (`split="all"`: the whole source);
    int64 [nsamples, seqlen]. With `bos_id`, each is BOS + `seqlen - 1` tokens of text."""
    return calibration_draw(tokenizer, source_spec, nsamples, seqlen, seed, chat_template, split, bos_id).windows


def calibration_draw(
    tokenizer, source_spec: SourceSpec, nsamples: int, seqlen: int, seed: int,
    chat_template: bool = False, split: CalibrationSplit = "calibration", bos_id: Optional[int] = None,
) -> CalibrationDraw:
    """calibration_windows, with the counts of the text they were drawn from."""
    if split not in ("calibration", "all"):
        raise ValueError(f"calibration.split: unknown split '{split}'; valid: calibration, all")
    source = _as_source(source_spec)
    _check_positive(("calibration.nsamples", nsamples), ("calibration.seqlen", seqlen))
    _check_fits_memory("calibration.nsamples", nsamples, "calibration.seqlen", seqlen)
    gen = torch.Generator().manual_seed(seed)
    full, seqlen = seqlen, seqlen - (bos_id is not None)  # `seqlen` is now the text per window
    if not source.has_documents:
        if chat_template:
            raise ValueError("calibration.chat_template: 'random-tokens' has no text to wrap")
        return CalibrationDraw(_with_bos(_random_tokens(tokenizer, nsamples, seqlen, gen), bos_id), 0, nsamples * seqlen)
    docs: Iterable[Document] = (
        split_documents(source, "calibration") if split == "calibration" else iter_documents(source)
    )
    if chat_template:
        docs = (Document(d.key, as_chat(tokenizer, d.text)) for d in docs)
    counts = [0, 0]  # documents, their tokens
    ids = _concat_ids(tokenizer, docs, limit=None, counts=counts)
    what = "calibration split" if split == "calibration" else "text"
    if ids.numel() < seqlen:
        raise ValueError(
            f"calibration.seqlen={full} is longer than the whole {what} of "
            f"'{source.describe()}' ({ids.numel()} tokens); lower it or use a larger "
            "calibration.dataset"
        )
    n_starts = ids.numel() - seqlen + 1
    if nsamples > n_starts:
        raise ValueError(
            f"calibration.nsamples={nsamples} is more than the {n_starts} distinct windows of "
            f"calibration.seqlen={full} tokens that the {what} of '{source.describe()}' "
            "holds; lower it or use a larger calibration.dataset"
        )
    starts = torch.randint(0, n_starts, (nsamples,), generator=gen)
    return CalibrationDraw(_with_bos(torch.stack([ids[s : s + seqlen] for s in starts.tolist()]), bos_id), *counts)


def evaluation_windows(
    tokenizer, source_spec: SourceSpec, n_windows: int, seqlen: int, bos_id: Optional[int] = None,
) -> torch.Tensor:
    """The perplexity protocol's text: the evaluation split, concatenated, cut from its start into
    consecutive non-overlapping windows of `seqlen`; the first `n_windows`, int64 [n, seqlen].
    With `bos_id`, each window is BOS + the next `seqlen - 1` tokens of text (the text stays
    consecutive across windows)."""
    source = _as_source(source_spec)
    _check_positive(("evaluate.windows", n_windows), ("evaluate.seqlen", seqlen))
    _check_fits_memory("evaluate.windows", n_windows, "evaluate.seqlen", seqlen)
    full, seqlen = seqlen, seqlen - (bos_id is not None)
    if not source.has_documents:
        gen = torch.Generator().manual_seed(_RANDOM_EVAL_SEED)
        return _with_bos(_random_tokens(tokenizer, n_windows, seqlen, gen), bos_id)
    need = n_windows * seqlen
    ids = _concat_ids(tokenizer, split_documents(source, "evaluation"), limit=need)
    if ids.numel() < need:
        raise ValueError(
            f"evaluate.windows={n_windows} x evaluate.seqlen={full} needs {need} tokens of text but the "
            f"evaluation split of '{source.describe()}' has only {ids.numel()} "
            f"(room for {ids.numel() // seqlen} windows); lower evaluate.windows or "
            "evaluate.seqlen, or use a larger evaluate.dataset"
        )
    return _with_bos(ids[:need].view(n_windows, seqlen).clone(), bos_id)


def _with_bos(windows: torch.Tensor, bos_id: Optional[int]) -> torch.Tensor:
    if bos_id is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos_id, dtype=torch.int64), windows], dim=1)


def windows_sha256(windows: torch.Tensor) -> str:
    """sha256 of the token ids as little-endian int64, row-major; the shape is not hashed.
    Equals hashlib.sha256(numpy.asarray(ids, dtype='<i8').tobytes()).hexdigest()."""
    arr = windows.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(arr.tobytes()).hexdigest()


def as_chat(tokenizer, text: str) -> str:
    """One document as a user/assistant exchange in the tokenizer's chat template: the first
    paragraph is the user turn and the rest the assistant's (a one-paragraph document becomes
    the assistant's answer to a fixed request)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "calibration.chat_template is true but the tokenizer has no chat template; "
            "set it to false for this model"
        )
    head, sep, rest = text.partition(SEPARATOR)
    if not sep or not rest.strip():
        head, rest = "Write a passage of text.", text
    messages = [{"role": "user", "content": head}, {"role": "assistant", "content": rest}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _as_source(spec: SourceSpec) -> TextSource:
    return spec if isinstance(spec, TextSource) else resolve_source(spec)


def _check_positive(*named: tuple[str, int]) -> None:
    for key, value in named:
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _check_fits_memory(n_key: str, n: int, len_key: str, seqlen: int) -> None:
    """The int64 ids of `n` windows must fit in this machine's memory (a typo such as
    nsamples: 1280000 would otherwise end in an allocation failure, or the OOM killer)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no bound to check
        return
    need = n * seqlen * 8
    if need > ram:
        raise ValueError(
            f"{n_key}={n} x {len_key}={seqlen} is {n * seqlen} token ids ({need / 2**30:.0f} GiB), "
            f"more than this machine's {ram / 2**30:.0f} GiB of memory; lower {n_key}"
        )


def _random_tokens(tokenizer, n: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    # Uniform over the base vocabulary [0, vocab_size); added special tokens are excluded.
    return torch.randint(0, tokenizer.vocab_size, (n, seqlen), generator=gen, dtype=torch.int64)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # verbose=False: documents may exceed model_max_length; we cut windows ourselves.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _concat_ids(
    tokenizer, docs: Iterable[Document], limit: int | None, counts: list[int] | None = None
) -> torch.Tensor:
    """Token ids of the documents joined by SEPARATOR; stops once `limit` tokens are reached
    (documents are tokenized in small batches, so only the text needed is tokenized).
    `counts`, when given, gets [documents joined, their tokens without separators]."""
    sep = _encode(tokenizer, [SEPARATOR])[0]
    pieces: list[torch.Tensor] = []
    total = 0
    for batch in _batched(docs, _BATCH_DOCS if limit is None else 4):
        for ids in _encode(tokenizer, [d.text for d in batch]):
            if pieces:
                pieces.append(torch.tensor(sep, dtype=torch.int64))
                total += len(sep)
            pieces.append(torch.tensor(ids, dtype=torch.int64))
            total += len(ids)
            if counts is not None:
                counts[0] += 1
                counts[1] += len(ids)
            if limit is not None and total >= limit:
                return torch.cat(pieces)
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)


def _batched(items: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
