"""Self-checking record files for the resume store (compress/resume.py).

A record is ``MAGIC | u64 header length | JSON header | payload | sha256`` where the header
says how many payload bytes follow and the trailing digest covers everything before it. It is
written to a temporary file in the same folder, fsynced, renamed over its name and the folder
fsynced, so a reader sees the old record or the new one; a file that was torn anyway (a power
cut on a filesystem that reorders, a truncation by hand) fails the size or digest check and is
treated as absent, never trusted. Tensors go into the payload as raw bytes (no pickle).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

MAGIC = b"CMPRSRS1"
TMP = ".tmp-"  # prefix of records being written; a killed writer's leftovers are removed
_DIGEST = 32
_CHUNK = 1 << 22
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)}


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (any dtype, bfloat16 too)."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"resume store: cannot hold {dtype} tensors")
    return name


def dtype_of(name: str) -> torch.dtype:
    return _DTYPES[name]  # a KeyError is a malformed record: the caller's check rejects it


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_record(path: Path, header: dict[str, Any], payload: Iterable[Union[bytes, memoryview]] = (),
                 payload_bytes: int = 0) -> None:
    """Write `path` atomically; `payload` yields exactly `payload_bytes` bytes (chunk by chunk,
    so an activation stream larger than memory passes through one batch at a time)."""
    head = json.dumps({**header, "payload_bytes": payload_bytes}, sort_keys=True).encode()
    tmp = path.with_name(f"{TMP}{path.name}-{secrets.token_hex(4)}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "xb") as f:
            for part in (MAGIC, len(head).to_bytes(8, "little"), head):
                f.write(part)
                digest.update(part)
            written = 0
            for chunk in payload:
                f.write(chunk)
                digest.update(chunk)
                written += len(chunk)
            if written != payload_bytes:
                raise ValueError(f"resume store: {path.name} got {written} payload bytes, expected {payload_bytes}")
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def read_header(path: Path) -> Optional[tuple[dict[str, Any], int]]:
    """The header of a whole, untampered record and where its payload starts; None for a
    missing, torn or foreign file. The digest is checked over the whole file."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
            n = int.from_bytes(f.read(8), "little")
            raw = f.read(n)
            header = json.loads(raw)
            start = len(MAGIC) + 8 + n
            size = os.fstat(f.fileno()).st_size
            if not isinstance(header, dict) or size != start + int(header["payload_bytes"]) + _DIGEST:
                return None
            f.seek(0)
            digest = hashlib.sha256()
            left = size - _DIGEST
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    return None
                digest.update(chunk)
                left -= len(chunk)
            if f.read(_DIGEST) != digest.digest():
                return None
            return header, start
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_into(path: Path, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor `out` with the bytes at `offset` of `path`."""
    buf = byte_view(out)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(buf) != len(buf):
            raise OSError(f"resume store: {path} is shorter than its header says")


def tensors_payload(tensors: dict[str, torch.Tensor]) -> tuple[list[dict], list[memoryview], int]:
    """Header entries, payload chunks and payload size for a dict of tensors, in its order."""
    entries, chunks, offset = [], [], 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        view = byte_view(t)
        entries.append({"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "offset": offset})
        chunks.append(view)
        offset += len(view)
    return entries, chunks, offset


def read_tensors(path: Path, entries: list[dict], start: int) -> dict[str, torch.Tensor]:
    out = {}
    for e in entries:
        t = torch.empty(tuple(e["shape"]), dtype=dtype_of(e["dtype"]))
        if t.numel():
            read_into(path, start + int(e["offset"]), t)
        out[e["name"]] = t
    return out
