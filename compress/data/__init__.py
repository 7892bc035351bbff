"""Calibration and evaluation text: named sources, a fixed document split, token windows."""
from compress.data.sources import (
    SOURCES, Document, TextSource, iter_documents, register_source, resolve_source,
)
from compress.data.splits import SPLITS, split_documents, split_of
from compress.data.windows import calibration_windows, evaluation_windows, windows_sha256

__all__ = [
    "SOURCES", "SPLITS", "Document", "TextSource", "calibration_windows", "evaluation_windows",
    "iter_documents", "register_source", "resolve_source", "split_documents", "split_of",
    "windows_sha256",
]
