"""Check an artifact folder against its manifest; the upload set is exactly what the manifest lists.

The manifest's "outputs" (bytes + sha256 per file, written by compress/formats/writer.py and extended by
compress/formats/seal.py for compress-results.json) is the only source of what gets published, plus the
manifest itself (it cannot list itself) and the generated card. Anything else in the folder is refused,
except debris that is never published (dotfiles, caches, locks). Symbolic links and special files are
refused wherever they are: a link could point anywhere, a FIFO would hang the hashing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from compress.hashing import sha256_file
from compress.publish.errors import PublishInputError

log = logging.getLogger(__name__)

MANIFEST = "compress-manifest.json"
RESULTS = "compress-results.json"
CONFIG = "config.json"
CARD = "README.md"

WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".onnx_data", ".onnx.data",
    ".h5", ".msgpack", ".npz", ".npy",
)
# Never uploaded: credentials, caches, half-written folders, locks, editor/OS debris.
_SKIP_DIRS = frozenset({"__pycache__", ".cache", ".git", ".huggingface"})
_SKIP_NAMES = frozenset({"token", "stored_tokens", "hf_token", ".netrc", ".env"})
_SKIP_SUFFIXES = (".lock", ".pyc", ".token", ".incomplete", ".tmp")
# A Hugging Face user access token: "hf_" and 34 letters (see huggingface.co/settings/tokens).
_TOKEN_RE = re.compile(rb"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}")
_SCAN_LIMIT = 64 * 2**20  # text files above this are weights or data, not config
# Files up to this size are read once: hashed, parsed and uploaded from the same bytes.
_IN_MEMORY_LIMIT = 16 * 2**20
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class UploadFile:
    """One file of the upload set: its repo path, size, sha256 and where its bytes come from."""

    path: str
    size: int
    sha256: str
    source: Union[Path, bytes]

    def read(self) -> bytes:
        return self.source if isinstance(self.source, bytes) else self.source.read_bytes()


@dataclass(frozen=True)
class Artifact:
    root: Path
    manifest: dict[str, Any]
    results: Optional[dict[str, Any]]  # parsed from the verified bytes; None when the artifact has none
    config: dict[str, Any]  # config.json, parsed from the verified bytes; {} when not listed
    files: tuple[UploadFile, ...]  # the manifest's outputs and the manifest, verified, sorted by path


def is_weight_file(path: str) -> bool:
    return path.lower().endswith(WEIGHT_SUFFIXES)


def is_skipped(relpath: str) -> bool:
    """True for a path that must never leave the machine, whatever the manifest says."""
    parts = relpath.split("/")
    if any(part.startswith(".") or part in _SKIP_DIRS for part in parts):
        return True  # dotfiles, .partial-* temp folders, .cache, .git
    name = parts[-1]
    return name in _SKIP_NAMES or name.endswith(_SKIP_SUFFIXES)


def _quoted(rel: str) -> str:
    """A file name for a one-line message: quoted, with control characters escaped."""
    return repr(rel) if _CONTROL.search(rel) else f"'{rel}'"


def _walk(root: Path) -> dict[str, int]:
    """relative path -> size of every regular file under `root`; refuses links and special files."""

    def unreadable(err: OSError) -> None:
        raise PublishInputError(f"{err.filename}: cannot read the artifact folder: {err.strerror}")

    found = {}
    for folder, dirs, names in os.walk(root, onerror=unreadable):  # does not enter linked folders
        for name in sorted(dirs + names):
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                raise PublishInputError(f"{_quoted(rel)} is a symbolic link; an artifact holds plain files only")
            if stat.S_ISREG(st.st_mode):
                found[rel] = st.st_size
            elif not stat.S_ISDIR(st.st_mode):
                raise PublishInputError(f"{_quoted(rel)} is not a regular file; an artifact holds plain files only")
    return found


def _check_path(rel: str) -> None:
    parts = rel.split("/")
    if rel.startswith("/") or _CONTROL.search(rel) or any(p in ("", ".", "..") for p in parts):
        raise PublishInputError(f"{MANIFEST}: outputs lists {rel!r}, which is not a plain relative path")
    if is_skipped(rel) or rel == MANIFEST:
        raise PublishInputError(f"{MANIFEST}: outputs lists '{rel}', which is never published")


def _verified(root: Path, rel: str, entry: Any, size: int) -> UploadFile:
    """The file `rel` as the manifest's `entry` records it (size, then sha256), or a refusal naming it."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise PublishInputError(f"{MANIFEST}: outputs['{rel}'] needs a sha256 (and bytes)")
    if entry.get("bytes") is not None and size != entry["bytes"]:
        raise PublishInputError(f"artifact mismatch: '{rel}' is {size} bytes, {MANIFEST} records {entry['bytes']}")
    path = root / rel
    source: Union[Path, bytes] = path.read_bytes() if size <= _IN_MEMORY_LIMIT else path
    digest = hashlib.sha256(source).hexdigest() if isinstance(source, bytes) else sha256_file(path)
    if digest != entry["sha256"].lower():
        raise PublishInputError(f"artifact mismatch: sha256 of '{rel}' is {digest}, {MANIFEST} records {entry['sha256']}")
    return UploadFile(rel, len(source) if isinstance(source, bytes) else size, digest, source)


def _json(data: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PublishInputError(f"{where}: not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise PublishInputError(f"{where}: must be a JSON object")
    return value


def _scan_for_tokens(item: UploadFile) -> None:
    if is_weight_file(item.path) or item.size > _SCAN_LIMIT:
        return
    if _TOKEN_RE.search(item.read()):
        raise PublishInputError(f"'{item.path}' contains what looks like a Hugging Face access token; remove it first")


def _refuse_unlisted(rel: str) -> None:
    if rel == RESULTS:
        raise PublishInputError(
            f"'{RESULTS}' is not recorded in {MANIFEST}, so the model card's numbers cannot be verified "
            f"(an artifact from before results were sealed, or an edited manifest); re-run `compress run` "
            f"to regenerate the artifact, or delete {RESULTS} to publish without measurements"
        )
    kind = "a weight file" if is_weight_file(rel) else "a file"
    raise PublishInputError(
        f"{_quoted(rel)} is {kind} that {MANIFEST} does not list; remove it (only listed files are published)"
    )


def load_artifact(artifact_dir: Union[str, Path], *, card: bool = True) -> Artifact:
    """Verify the artifact and return its upload set. With `card`, an unlisted README.md is left out (the
    generated card replaces it); without, it is refused like any other unlisted file."""
    root = Path(artifact_dir)
    if not root.is_dir():
        raise PublishInputError(f"{root}: not a directory")
    found = _walk(root)
    if MANIFEST not in found:
        raise PublishInputError(f"{root}: no {MANIFEST}; is this a compress artifact folder?")
    manifest_bytes = (root / MANIFEST).read_bytes()
    manifest = _json(manifest_bytes, str(root / MANIFEST))
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        raise PublishInputError(f"{root / MANIFEST}: 'outputs' must list the artifact's files")
    for rel in outputs:
        _check_path(rel)
    for rel in found:
        if rel not in outputs and rel != MANIFEST and not (card and rel == CARD) and not is_skipped(rel):
            _refuse_unlisted(rel)

    files = [UploadFile(MANIFEST, len(manifest_bytes), hashlib.sha256(manifest_bytes).hexdigest(), manifest_bytes)]
    for rel, entry in sorted(outputs.items()):
        if rel not in found:
            raise PublishInputError(f"artifact incomplete: '{rel}' is listed in {MANIFEST} but missing from {root}")
        files.append(_verified(root, rel, entry, found[rel]))
    by_path = {f.path: f for f in files}
    for item in files:
        _scan_for_tokens(item)

    def parsed(name: str) -> Optional[dict[str, Any]]:
        item = by_path.get(name)
        if item is None:
            return None
        if not isinstance(item.source, bytes):
            raise PublishInputError(f"'{name}' is {item.size} bytes; too large to be what compress writes")
        return _json(item.source, f"{root / name}")

    files.sort(key=lambda f: f.path)
    return Artifact(root, manifest, parsed(RESULTS), parsed(CONFIG) or {}, tuple(files))


def in_memory(path: str, data: bytes) -> UploadFile:
    return UploadFile(path, len(data), hashlib.sha256(data).hexdigest(), data)
