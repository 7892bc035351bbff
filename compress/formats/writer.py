"""Atomic, sharded writing of a model folder.

Everything is written into a hidden sibling ``.<name>.partial-<random>`` and renamed to the
final name only once complete, with ``compress-manifest.json`` (sizes and sha256 of every
other file) written last. A folder at the final path therefore always holds a finished
artifact; a crash leaves at most a ``.partial-`` folder that nothing mistakes for a model, and
its owner record (compress/owner.py) lets a later run remove it once this process is gone.

Tensor bytes are appended to a spill file as they arrive and turned into a safetensors shard
(header, then the spilled bytes copied in chunks) whenever a shard would exceed
``max_shard_bytes``, so a block-streaming pipeline holds at most the block in hand.
Shard names follow the Hugging Face convention (``model.safetensors`` or
``model-00001-of-00003.safetensors`` plus ``model.safetensors.index.json``).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from compress.hashing import sha256_file
from compress.models.checkpoint import all_finite
from compress.owner import OWNER, make_partial

log = logging.getLogger(__name__)

MANIFEST = "compress-manifest.json"
CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2_000_000_000  # "2GB" as transformers' save_pretrained counts it
_RESERVED = {MANIFEST, CONFIG, SINGLE, INDEX, OWNER}


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# safetensors dtype names (https://github.com/huggingface/safetensors, format spec)
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_COPY_CHUNK = 1 << 24


def _names_folder(method):
    """An OSError without a file name (a full disk fails `write()`, which names nothing) is
    raised again naming the folder being written, so the user learns which disk filled up."""

    @functools.wraps(method)
    def wrapper(self: "ArtifactWriter", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            if e.filename is not None or e.errno is None:
                raise
            raise OSError(e.errno, e.strerror or str(e), str(self.tmp_dir)) from e

    return wrapper


def stream_tensor(out, name: str, chunks, shape: tuple[int, ...], store: torch.dtype, align: int) -> tuple[int, int]:
    """Write a tensor's row slices to the open binary file `out` as raw `store` bytes, then zero
    padding to `align`: (bytes written, padding). Refuses NaN/Inf and slices whose sizes do not
    add up to `shape`. Shared by the formats that keep one data file (GGUF, ONNX external data)."""
    from compress.models.checkpoint import all_finite

    written = 0
    for c in chunks:
        c = c.detach().to("cpu")
        if c.is_floating_point() and not all_finite(c):
            raise ValueError(f"tensor '{name}' contains NaN or Inf; refusing to write it")
        c = c.to(store).contiguous()
        out.write(memoryview(c.reshape(-1).view(torch.uint8).numpy()))
        written += c.numel() * c.element_size()
    size = math.prod(shape) * torch.empty((), dtype=store).element_size()
    if written != size:
        raise ValueError(f"tensor '{name}': slices hold {written} bytes, its shape {shape} needs {size}")
    pad = -written % align
    out.write(b"\0" * pad)
    return written, pad


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


class ArtifactWriter:
    """Write one model folder atomically. Use as a context manager; call :meth:`finish`."""

    def __init__(
        self,
        final_dir: Union[str, Path],
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.final_dir = Path(final_dir).absolute()
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self._refuse_clobber()
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = make_partial(self.final_dir.parent, f".{self.final_dir.name}.partial-")
        self._buffer: dict[str, dict[str, Any]] = {}  # header entries of the shard in progress
        self._spill: Optional[Any] = None  # open file receiving that shard's tensor bytes
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # temporary shard file, tensor names
        self._names: set[str] = set()
        self._total_bytes = 0
        self._files: set[str] = set()
        self._done = False

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if not self._done:
            if exc_type is None:
                log.warning("ArtifactWriter for %s closed without finish(); discarding", self.final_dir)
            self.abort()

    def abort(self) -> None:
        """Remove the temporary folder; the final path is left untouched."""
        self._buffer.clear()
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self._done = True
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _refuse_clobber(self) -> None:
        d = self.final_dir
        if d.exists() and not self.overwrite and not _is_empty_dir(d):
            raise FileExistsError(
                f"{d} exists and is not empty; pass overwrite=True (export.overwrite: true) to replace it"
            )

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("ArtifactWriter is already finished or aborted")

    # -- content ---------------------------------------------------------------------------
    def add_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Buffer tensors; a full buffer is written out as the next shard."""
        for name, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            self.add_tensor_chunks(name, t.dtype, tuple(t.shape), [t])

    @_names_folder
    def add_tensor_chunks(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], chunks: Iterable[torch.Tensor]
    ) -> None:
        """Add one tensor given as consecutive slices along its first dimension, so a large
        one (an embedding being cast to fp16) is never whole in memory."""
        self._check_open()
        if name in self._names:
            raise ValueError(f"tensor '{name}' was already added")
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor '{name}' has dtype {dtype}, which safetensors cannot store")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        if self._spill is None:
            self._spill = open(self.tmp_dir / ".spill", "wb")
        written = 0
        try:
            for c in chunks:
                c = c.detach().to("cpu").contiguous()
                if c.dtype != dtype or tuple(c.shape[1:]) != tuple(shape[1:]):
                    raise ValueError(f"tensor '{name}': a slice {c.dtype} {tuple(c.shape)} does not fit {dtype} {shape}")
                if c.is_floating_point() and not all_finite(c):
                    raise ValueError(f"tensor '{name}' contains NaN or Inf; refusing to write it")
                self._spill.write(memoryview(c.reshape(-1).view(torch.uint8).numpy()))
                written += _tensor_bytes(c)
            if written != size:
                raise ValueError(f"tensor '{name}': slices hold {written} bytes, its shape {shape} needs {size}")
        except BaseException:
            if written:  # the spill holds part of this tensor: nothing sound can follow
                self.abort()
            raise
        end = self._buffer_bytes + size
        self._buffer[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [self._buffer_bytes, end]}
        self._buffer_bytes = end
        self._names.add(name)
        self._total_bytes += size

    def _flush(self) -> None:
        """Write the spilled tensors as one safetensors shard: u64 header length, JSON header
        padded with spaces to 8 bytes, then the raw bytes in the header's order."""
        if not self._buffer:
            return
        path = self.tmp_dir / f".shard-{len(self._shards) + 1:05d}.safetensors"
        assert self._spill is not None
        self._spill.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._buffer}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        spill = self.tmp_dir / ".spill"
        with open(path, "wb") as out, open(spill, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, _COPY_CHUNK)
        spill.unlink()
        self._spill = None
        self._shards.append((path, list(self._buffer)))
        log.debug("wrote shard %s (%d tensors, %d bytes)", path.name, len(self._buffer), self._buffer_bytes)
        self._buffer = {}
        self._buffer_bytes = 0

    @_names_folder
    def add_file(self, name: str, content: Union[bytes, str, os.PathLike]) -> None:
        """Add a side file (tokenizer, generation config, ...): ``bytes`` or a path to copy."""
        self._check_open()
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"file name '{name}' must be a relative path inside the artifact")
        if rel.as_posix() in _RESERVED or rel.name.endswith(".safetensors"):
            raise ValueError(f"file name '{name}' is reserved for the writer")
        if rel.as_posix() in self._files:
            raise ValueError(f"file '{name}' was already added")
        dest = self.tmp_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            dest.write_bytes(content)
        else:
            shutil.copyfile(content, dest)
        self._files.add(rel.as_posix())

    # -- completion ------------------------------------------------------------------------
    def _place_shards(self) -> None:
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.tmp_dir / SINGLE)
            return
        weight_map: dict[str, str] = {}
        for k, (path, names) in enumerate(self._shards, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            path.rename(self.tmp_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.tmp_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def _outputs(self) -> dict[str, dict[str, Any]]:
        out = {}
        for p in sorted(self.tmp_dir.rglob("*")):
            if p.is_file() and p != self.tmp_dir / OWNER:
                rel = p.relative_to(self.tmp_dir).as_posix()
                out[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        return out

    @_names_folder
    def finish(self, config_json: Mapping[str, Any], manifest: Mapping[str, Any]) -> Path:
        """Write shards, ``config.json`` and the manifest, then move the folder into place."""
        self._check_open()
        self._flush()
        if not self._shards:
            raise ValueError("no tensors were added; refusing to write an artifact without weights")
        self._place_shards()
        self._seal(config_json, manifest)
        self._done = True
        log.info("wrote %s (%d shard(s), %d tensor bytes)", self.final_dir, len(self._shards), self._total_bytes)
        return self.final_dir

    def _seal(self, config_json: dict, manifest: dict) -> None:
        """config.json, then the manifest over every output, then the rename: the last steps of
        every writer, whatever it wrote before."""
        (self.tmp_dir / CONFIG).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        full = dict(manifest)
        full["outputs"] = self._outputs()
        # Written last: its presence is what marks the folder complete.
        with open(self.tmp_dir / MANIFEST, "w") as f:
            f.write(json.dumps(full, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        (self.tmp_dir / OWNER).unlink()  # the finished folder carries no trace of this process
        self._move_into_place()

    def _move_into_place(self) -> None:
        move_into_place(self.tmp_dir, self.final_dir, self.overwrite)


def move_into_place(tmp_dir: Path, final: Path, overwrite: bool) -> None:
    """Rename a complete partial folder (manifest written, owner record removed) to `final`: the
    last step of every writer, and of a Ray driver receiving a streamed artifact
    (compress/executor/stream.py)."""
    if _is_empty_dir(final):
        final.rmdir()
    if not final.exists():
        tmp_dir.rename(final)
        return
    if not overwrite:
        raise FileExistsError(f"{final} appeared while writing; pass overwrite=True to replace it")
    # Swap: the old folder leaves only after the new one is complete on disk.
    old = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
    final.rename(old)
    tmp_dir.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def is_complete(folder: Union[str, Path], check_hashes: bool = False) -> bool:
    """True when ``folder`` holds a finished artifact whose files match its manifest."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        outputs = manifest["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for rel, info in outputs.items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != info["bytes"]:
            return False
        if check_hashes and sha256_file(p) != info["sha256"]:
            return False
    return True
