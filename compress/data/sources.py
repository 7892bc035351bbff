"""Named text sources: a registry of document readers and the one resolver the config uses.

A source yields `Document`s lazily. Nothing is cached or copied into the repository: the
built-in corpora are read at run time from packages installed in the environment.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
HF_PREFIX = "hf:"
RANDOM_TOKENS = "random-tokens"  # no documents: token ids drawn uniformly (see windows.py)
_NOT_NAMES = {"txt", "jsonl", "parquet", "hf"}  # registry entries reached by path or prefix


@dataclass(frozen=True)
class Document:
    """One unit of text. `key` is stable across runs and decides the split (see splits.py)."""

    key: str
    text: str


@dataclass(frozen=True)
class TextSource:
    """A resolved text source.

    name: registry name ("wikipedia", "shakespeare", "random-tokens", "txt", "jsonl",
          "parquet", "hf"). path: the file path, or the Hugging Face dataset id for "hf".
    hf_config: the dataset configuration for "hf". text_field: the field holding the text for
    jsonl / parquet / hf. eval_fraction: the share of documents assigned to evaluation.
    """

    name: str
    path: Optional[str] = None
    hf_config: Optional[str] = None
    text_field: str = "text"
    eval_fraction: float = 0.2

    @property
    def has_documents(self) -> bool:
        return self.name != RANDOM_TOKENS

    def same_text(self, other: "TextSource") -> bool:
        """Whether both read the same documents (files compared by their real path)."""
        def where(src: TextSource) -> Optional[str]:
            return os.path.realpath(src.path) if src.path and src.name != "hf" else src.path

        return (self.name, self.hf_config, self.text_field, where(self)) == (
            other.name, other.hf_config, other.text_field, where(other))

    def describe(self) -> str:
        if self.name == "hf":
            return f"hf:{self.path}" + (f":{self.hf_config}" if self.hf_config else "")
        return self.path or self.name


Reader = Callable[[TextSource], Iterator[Document]]
SOURCES: dict[str, Reader] = {}


def register_source(name: str) -> Callable[[Reader], Reader]:
    def wrap(fn: Reader) -> Reader:
        SOURCES[name] = fn
        return fn

    return wrap


def _named_sources() -> list[str]:
    return sorted({n for n in SOURCES if n not in _NOT_NAMES} | {RANDOM_TOKENS})


def _valid_names() -> str:
    return (
        f"{', '.join(_named_sources())}, a file path ending in "
        f"{' / '.join(FILE_SUFFIXES)}, or hf:<dataset_id>[:config]"
    )


def resolve_source(spec: str, text_field: str = "text", eval_fraction: float = 0.2) -> TextSource:
    """Turn a config string into a TextSource, failing early with a message that says why."""
    _register_builtins()
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"text source must be a non-empty string; valid: {_valid_names()}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie strictly between 0 and 1, got {eval_fraction}")
    if spec.startswith(HF_PREFIX):
        dataset_id, _, config = spec[len(HF_PREFIX):].partition(":")
        if not dataset_id:
            raise ValueError(f"'{spec}': expected hf:<dataset_id>[:config]")
        if importlib.util.find_spec("datasets") is None:
            raise ValueError(_datasets_missing(spec))
        return TextSource("hf", dataset_id, config or None, text_field, eval_fraction)
    suffix = os.path.splitext(spec)[1].lower()
    if suffix in FILE_SUFFIXES:
        if not os.path.isfile(spec):
            raise ValueError(f"text file '{spec}' does not exist (or is not a file)")
        if os.path.getsize(spec) == 0:
            raise ValueError(f"text file '{spec}' is empty")
        if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
            raise ValueError(_pyarrow_missing(spec))
        return TextSource(suffix[1:], spec, None, text_field, eval_fraction)
    if spec in _named_sources():
        return TextSource(spec, None, None, text_field, eval_fraction)
    raise ValueError(f"unknown text source '{spec}'; valid: {_valid_names()}")


def iter_documents(source: TextSource) -> Iterator[Document]:
    """All documents of a source in a fixed order (both splits; see splits.py)."""
    _register_builtins()
    if not source.has_documents:
        raise ValueError(f"'{source.name}' has no documents; it yields token ids directly")
    try:
        reader = SOURCES[source.name]
    except KeyError:
        raise ValueError(f"unknown text source '{source.name}'; valid: {_valid_names()}") from None
    return reader(source)


def _register_builtins() -> None:
    # Imported for their @register_source side effect; deferred so that importing this module
    # stays cheap and free of import cycles.
    from compress.data import shakespeare, wikipedia  # noqa: F401


# ---- user files ---------------------------------------------------------------------------


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; other bytes are a ValueError naming the file
    (not the line: the file is decoded in chunks ahead of the line being read)."""
    with open(path, encoding="utf-8") as fh:
        try:
            yield from enumerate(fh, 1)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x})") from None


@register_source("txt")
def _read_txt(source: TextSource) -> Iterator[Document]:
    """Documents are separated by one or more blank lines."""
    paragraph: list[str] = []
    for _, line in _lines(source.path):
        if line.strip():
            paragraph.append(line.rstrip("\n"))
        elif paragraph:
            yield _content_keyed("\n".join(paragraph))
            paragraph = []
    if paragraph:
        yield _content_keyed("\n".join(paragraph))


@register_source("jsonl")
def _read_jsonl(source: TextSource) -> Iterator[Document]:
    for lineno, line in _lines(source.path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source.path}:{lineno}: not valid JSON ({exc.msg})") from None
        yield from _from_record(record, source, f"{source.path}:{lineno}")


@register_source("parquet")
def _read_parquet(source: TextSource) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(_pyarrow_missing(source.path)) from None
    pf = pq.ParquetFile(source.path)
    if source.text_field not in pf.schema_arrow.names:
        raise ValueError(
            f"{source.path}: no column '{source.text_field}' (calibration.text_field); "
            f"columns: {', '.join(pf.schema_arrow.names)}"
        )
    for batch in pf.iter_batches(columns=[source.text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield _content_keyed(text)


@register_source("hf")
def _read_hf(source: TextSource) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise ValueError(_datasets_missing(source.describe())) from None
    try:
        # The "train" split only: our own hash split (splits.py) divides it further.
        ds = datasets.load_dataset(source.path, source.hf_config, split="train", streaming=True)
    except Exception as exc:  # offline, unknown id, gated: all surface as one clear error
        raise ValueError(
            f"could not load Hugging Face dataset '{source.describe()}' through the datasets "
            f"cache ({type(exc).__name__}: {exc}). If this machine is offline, download it "
            "elsewhere first or export it to a local .jsonl/.parquet file."
        ) from exc
    for i, record in enumerate(ds):
        yield from _from_record(record, source, f"{source.describe()} row {i}")


def _from_record(record: object, source: TextSource, where: str) -> Iterator[Document]:
    if not isinstance(record, dict) or source.text_field not in record:
        raise ValueError(f"{where}: no field '{source.text_field}' (calibration.text_field)")
    text = record[source.text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field '{source.text_field}' is not a string")
    if text.strip():
        yield _content_keyed(text)


def _content_keyed(text: str) -> Document:
    # User documents have no titles; keying by content also sends exact duplicates to one split.
    return Document(key=text, text=text)


def _pyarrow_missing(path: Optional[str]) -> str:
    return f"reading '{path}' needs pyarrow: pip install 'compress[data]' (or pyarrow)"


def _datasets_missing(spec: str) -> str:
    return (
        f"'{spec}' needs the Hugging Face `datasets` package, which is not installed "
        "(pip install datasets), or export the text to a local .jsonl/.parquet file"
    )
