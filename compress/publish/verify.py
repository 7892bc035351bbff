"""Check an artifact folder against its manifest and choose the files that may be published."""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from compress.hashing import sha256_file
from compress.publish.errors import PublishInputError

log = logging.getLogger(__name__)

MANIFEST = "compress-manifest.json"
RESULTS = "compress-results.json"
CARD = "README.md"

# Files the manifest deliberately does not list (it cannot list itself; results and the card come later).
UNLISTED_OK = frozenset({MANIFEST, RESULTS, CARD})
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
    results: Optional[dict[str, Any]]
    files: tuple[UploadFile, ...]  # verified, filtered, sorted by path


def is_weight_file(path: str) -> bool:
    return path.lower().endswith(WEIGHT_SUFFIXES)


def is_skipped(relpath: str) -> bool:
    """True for a path that must never leave the machine, whatever the manifest says."""
    parts = relpath.split("/")
    if any(part.startswith(".") or part in _SKIP_DIRS for part in parts):
        return True  # dotfiles, .partial-* temp folders, .cache, .git
    name = parts[-1]
    return name in _SKIP_NAMES or name.endswith(_SKIP_SUFFIXES)


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PublishInputError(f"{path.parent}: no {path.name}; is this a compress artifact folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PublishInputError(f"{path}: cannot read {what}: {err}") from None
    if not isinstance(data, dict):
        raise PublishInputError(f"{path}: {what} must be a JSON object")
    return data


def _walk(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not is_skipped(rel):
            found.append(rel)
    return found


def _check_outputs(root: Path, outputs: dict[str, Any]) -> dict[str, str]:
    """Every file the manifest lists exists with its recorded size and sha256; returns path -> sha256."""
    checked = {}
    for rel, entry in sorted(outputs.items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise PublishInputError(f"{MANIFEST}: outputs['{rel}'] needs a sha256 (and bytes)")
        if is_skipped(rel) or rel in UNLISTED_OK:
            raise PublishInputError(f"{MANIFEST}: outputs lists '{rel}', which is never published")
        path = root / rel
        if not path.is_file():
            raise PublishInputError(f"artifact incomplete: '{rel}' is listed in {MANIFEST} but missing from {root}")
        size = path.stat().st_size
        if entry.get("bytes") is not None and size != entry["bytes"]:
            raise PublishInputError(
                f"artifact mismatch: '{rel}' is {size} bytes, {MANIFEST} records {entry['bytes']}"
            )
        digest = sha256_file(path)
        if digest != entry["sha256"].lower():
            raise PublishInputError(
                f"artifact mismatch: sha256 of '{rel}' is {digest}, {MANIFEST} records {entry['sha256']}"
            )
        checked[rel] = digest
    return checked


def _scan_for_tokens(root: Path, rel: str) -> None:
    path = root / rel
    if is_weight_file(rel) or path.stat().st_size > _SCAN_LIMIT:
        return
    if _TOKEN_RE.search(path.read_bytes()):
        raise PublishInputError(f"'{rel}' contains what looks like a Hugging Face access token; remove it first")


def load_artifact(artifact_dir: Union[str, Path], *, drop: frozenset[str] = frozenset()) -> Artifact:
    """Verify the artifact and return its publishable files; `drop` names files to leave out (e.g. README.md)."""
    root = Path(artifact_dir)
    if not root.is_dir():
        raise PublishInputError(f"{root}: not a directory")
    manifest = _load_json(root / MANIFEST, "the manifest")
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        raise PublishInputError(f"{root / MANIFEST}: 'outputs' must list the artifact's files")
    results = _load_json(root / RESULTS, "the results") if (root / RESULTS).is_file() else None

    verified = _check_outputs(root, outputs)
    files = []
    for rel in _walk(root):
        if rel in drop:
            continue
        if rel not in verified:
            if is_weight_file(rel):
                raise PublishInputError(f"'{rel}' is a weight file that {MANIFEST} does not list; remove it")
            if rel not in UNLISTED_OK:
                log.warning("publishing '%s', which %s does not list", rel, MANIFEST)
            _scan_for_tokens(root, rel)
        elif not is_weight_file(rel):
            _scan_for_tokens(root, rel)
        path = root / rel
        digest = verified.get(rel) or sha256_file(path)
        files.append(UploadFile(rel, path.stat().st_size, digest, path))
    return Artifact(root, manifest, results, tuple(files))


def in_memory(path: str, data: bytes) -> UploadFile:
    return UploadFile(path, len(data), hashlib.sha256(data).hexdigest(), data)
