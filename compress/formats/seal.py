"""Add a file to a finished artifact and record it in the manifest, so publishing can verify it.

The file is written first, then the manifest is replaced with one whose "outputs" also lists the
file's bytes and sha256. Both writes go to a temporary file in the same folder, are fsynced and
renamed over the target (os.replace is atomic within a filesystem), and the folder is fsynced so
the renames survive a power cut. A crash between the two leaves a file the manifest does not
record (or records with the old hash): publishing refuses it, and sealing again repairs it.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Union

from compress.formats.writer import MANIFEST


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_file(artifact: Union[str, Path], name: str, data: bytes) -> dict[str, Any]:
    """Write `data` as `artifact/name` and add it to the manifest's outputs; returns its outputs entry.

    `name` is a plain file name in the artifact's top folder (not the manifest itself).
    """
    folder = Path(artifact)
    if not name or "/" in name or "\\" in name or name in (".", "..", MANIFEST):
        raise ValueError(f"seal_file: {name!r} is not a file name that can be sealed into an artifact")
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))  # a finished artifact has one
    if not isinstance(manifest.get("outputs"), dict):
        raise ValueError(f"{manifest_path}: no 'outputs' to add {name} to")
    _replace(folder / name, data)
    entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["outputs"][name] = entry
    _replace(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    _fsync_dir(folder)
    return entry


def seal_json(artifact: Union[str, Path], name: str, obj: Any) -> dict[str, Any]:
    """seal_file with `obj` written as indented JSON."""
    return seal_file(artifact, name, (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"))
