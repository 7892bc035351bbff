"""Deterministic calibration / evaluation split by a stable hash of each document's key.

A document goes to "evaluation" when the first 8 bytes of sha256("compress-split-v1\\0" + key),
read as a big-endian integer and divided by 2**64, fall below `eval_fraction`; otherwise to
"calibration". The assignment depends only on the key (never on order, count, seed or Python's
salted `hash`), so the two splits can never share a document and never drift between runs.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Literal

from compress.data.sources import Document, TextSource, iter_documents

Split = Literal["calibration", "evaluation"]
SPLITS: tuple[Split, ...] = ("calibration", "evaluation")
_SALT = b"compress-split-v1\0"


def split_of(key: str, eval_fraction: float) -> Split:
    digest = hashlib.sha256(_SALT + key.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "evaluation" if u < eval_fraction else "calibration"


def split_documents(source: TextSource, split: Split) -> Iterator[Document]:
    """The documents of one split, in source order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    for doc in iter_documents(source):
        if split_of(doc.key, source.eval_fraction) == split:
            yield doc
