"""The resume store: finished blocks of an interrupted run, so `--resume` continues from them.

Layout, under the output folder (which the run holds locked, compress/lock.py)::

    OUT/.resume/fingerprint.rec          what the blocks were computed from
    OUT/.resume/<candidate>/block-00003.rec  block 3 as the exporter writes it
    OUT/.resume/<candidate>/state.rec    the next block to quantize, the layer reports so far,
                                         and the calibration activations that feed that block
    OUT/.resume/<candidate>/done.rec     the candidate's artifact is complete (blocks dropped)

Every file is a self-checking record (compress/resume_io.py). A block record holds the tensors
`Exporter.add_block` hands to the writer (already cast and packed by the format) and the
format metadata that `Exporter.finish` needs, so replaying them rebuilds the same shards byte
for byte. The state is written after the block's record, so it never points past a block that
is not on disk; only the latest activation stream is kept. A block is restored only while
every input in the fingerprint is unchanged: the model files, the calibration windows, the
resolved settings that shape the weights, the compress, torch and transformers versions, and
the runtime settings the bytes depend on (device, torch threads).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch

from compress import __version__
from compress.config import ConfigError
from compress.resume_io import (
    TMP, byte_view, dtype_name, dtype_of, read_header, read_into, read_tensors, tensors_payload,
    write_record,
)

log = logging.getLogger(__name__)

STORE = ".resume"
_FINGERPRINT = "fingerprint.rec"
_STATE = "state.rec"
_DONE = "done.rec"
_VERSIONED = ("torch", "transformers")
_AGAIN = "rerun without --resume"


def store_dir(out_dir: Path) -> Path:
    return Path(out_dir) / STORE


def _folder_name(candidate: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", candidate):
        return candidate
    return "c-" + hashlib.sha256(candidate.encode()).hexdigest()[:16]


def fingerprint(ctx) -> dict[str, Any]:
    """What the stored blocks depend on; output paths and evaluation settings are left out."""
    from compress.hashing import sha256_file
    from compress.quantizers import get_method

    cfg = ctx.cfg
    files = dict(ctx.input_hashes)
    config_json = ctx.loaded.root / "config.json"
    if config_json.is_file():
        files["config.json"] = sha256_file(config_json)
    calibrated = any(get_method(p.q.method).needs_calibration for p in ctx.plans)
    versions = {}
    for p in _VERSIONED:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    from compress.stages.export import runtime_settings

    runtime = runtime_settings(ctx.loaded.device)
    return {
        "compress version": __version__,
        "package versions": versions,
        # reductions follow the thread count: blocks of another setting would not be the same bytes
        "runtime settings": {k: runtime[k] for k in ("device", "torch_threads", "deterministic_algorithms")},
        "model files": files,
        "calibration windows": ctx.calibration.windows_sha256 if calibrated and ctx.calibration else None,
        "config": {
            "model.dtype": cfg.model.dtype, "model.device": cfg.model.device,
            "export.format": cfg.export.format, "export.dtype": cfg.export.dtype,
            "candidates": [{"name": p.name, **p.q.model_dump(mode="json")} for p in ctx.plans],
        },
    }


def _first_difference(old: Any, new: Any, path: str) -> str:
    """The first key path where two JSON values differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            here = f"{path}.{k}" if path else str(k)
            if k not in old or k not in new:
                return f"{here} {'is new' if k not in old else 'is gone'}"
            if old[k] != new[k]:
                return _first_difference(old[k], new[k], here)
    return f"{path}: {json.dumps(old)} -> {json.dumps(new)}"


def _config_difference(old: dict, new: dict) -> str:
    """Where the weight-shaping settings differ, as the key a user edits: `quantize.bits` for
    a run of one candidate, `candidates.K.bits` for the K-th of several."""
    a, b = old.get("candidates"), new.get("candidates")
    if a != b and isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"candidates: {len(a)} -> {len(b)} candidates"
        k = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
        x, y = ({n: v for n, v in c.items() if n != "name"} for c in (a[k], b[k]))
        where = "quantize" if len(a) == 1 else f"candidates.{k}"
        if x == y:
            return f"{where}.name: {json.dumps(a[k].get('name'))} -> {json.dumps(b[k].get('name'))}"
        return _first_difference(x, y, where)
    return _first_difference(old, new, "")


def changed_input(old: dict, new: dict) -> Optional[str]:
    """A sentence naming the first input that differs between two fingerprints, or None."""
    for key in ("compress version", "package versions", "runtime settings", "model files", "calibration windows",
                "config"):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "model files" and isinstance(a, dict) and isinstance(b, dict):
            names = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
            return f"the model files changed since the interrupted run ({', '.join(names)})"
        if key == "calibration windows":
            return (f"the calibration windows changed since the interrupted run (sha256 "
                    f"{str(a)[:12]} -> {str(b)[:12]})")
        if key == "config" and isinstance(a, dict) and isinstance(b, dict):
            return f"the config changed since the interrupted run ({_config_difference(a, b)})"
        return f"the {key} changed since the interrupted run ({_first_difference(a, b, key)})"
    return None


@dataclass
class ResumePoint:
    """Where a candidate's quantization continues: at block `start`, with the layer reports of
    blocks before it and, for methods that read calibration data, the stream that feeds it."""

    start: int = 0
    reports: list[dict] = field(default_factory=list)
    walker: dict = field(default_factory=dict)  # the block walker's state (compress/stages/quantize.py)
    seconds: float = 0.0  # spent on the blocks before `start` by the interrupted run(s)


class CandidateStore:
    """One candidate's finished blocks and progress."""

    def __init__(self, folder: Path, name: str, store: "ResumeStore") -> None:
        self.folder, self.name, self.store = folder, name, store
        self._clock = (time.perf_counter(), 0.0)  # (when this run took over, seconds before it)

    def seconds(self) -> float:
        """Quantization time of this candidate so far, interrupted runs included."""
        started, before = self._clock
        return before + time.perf_counter() - started

    def _block(self, i: int) -> Path:
        return self.folder / f"block-{i:05d}.rec"

    def _ensure(self) -> None:
        self.store.ensure()
        self.folder.mkdir(parents=True, exist_ok=True)

    # -- writing -----------------------------------------------------------------------------
    def save_block(self, i: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self._ensure()
        entries, chunks, size = tensors_payload(tensors)
        write_record(self._block(i), {"kind": "block", "index": i, "tensors": entries, "meta": meta},
                     chunks, size)

    def save_progress(self, next_block: int, stream, reports: list[dict], walker: dict) -> None:
        """The block walk has finished block ``next_block - 1``; `stream` (a WindowStream or
        None) now holds the inputs of block `next_block` and is copied one batch at a time."""
        self._ensure()
        header: dict[str, Any] = {"kind": "state", "next": next_block, "reports": reports, "walker": walker,
                                  "seconds": self.seconds(), "stream": None}
        chunks: Any = ()
        size = 0
        if stream is not None:
            shape = stream.window_shape
            probe = stream.read(0, 1)
            per_window = probe[0].numel() * probe.element_size()
            header["stream"] = {"windows": len(stream), "shape": list(shape), "dtype": dtype_name(probe.dtype)}
            size = per_window * len(stream)

            def batches(step: int = 8):
                for s in range(0, len(stream), step):
                    yield byte_view(stream.read(s, s + step).to("cpu").contiguous())

            chunks = batches()
        write_record(self.folder / _STATE, header, chunks, size)

    def mark_done(self, record: dict) -> None:
        """The artifact is complete: keep only `record` (reports, metrics), drop blocks and stream."""
        self._ensure()
        write_record(self.folder / _DONE, {"kind": "done", **record})
        for p in sorted(self.folder.glob("*.rec")):
            if p.name != _DONE:
                p.unlink()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- reading -----------------------------------------------------------------------------
    def done(self) -> Optional[dict]:
        got = read_header(self.folder / _DONE)
        return got[0] if got and got[0].get("kind") == "done" else None

    def resume_point(self, n_blocks: int) -> ResumePoint:
        """The latest consistent progress; block 0 (and a cleared store) when there is none or
        any record it needs is torn."""
        got = read_header(self.folder / _STATE)
        if got is None:
            if any(self.folder.glob("*.rec")):
                log.warning("resume store of %s: no readable progress record; starting it from block 0", self.name)
            self._clear()
            return ResumePoint()
        state, _ = got
        nxt = state.get("next")
        if not isinstance(nxt, int) or not 0 < nxt <= n_blocks:
            log.warning("resume store of %s: progress record names block %r of %d; starting from block 0",
                        self.name, nxt, n_blocks)
            self._clear()
            return ResumePoint()
        torn = [i for i in range(nxt) if self._block_header(i) is None]
        if torn:
            log.warning("resume store of %s: the record of block %d is torn or missing; starting from block 0",
                        self.name, torn[0])
            self._clear()
            return ResumePoint()
        for stale in range(nxt, n_blocks):  # written before the progress record that follows it
            self._block(stale).unlink(missing_ok=True)
        log.info("resuming %s at block %d of %d", self.name, nxt, n_blocks)
        seconds = float(state.get("seconds") or 0.0)
        self._clock = (time.perf_counter(), seconds)
        return ResumePoint(nxt, list(state.get("reports") or []), dict(state.get("walker") or {}), seconds)

    def _clear(self) -> None:
        for p in self.folder.glob("*.rec"):
            p.unlink()

    def _block_header(self, i: int) -> Optional[tuple[dict, int]]:
        got = read_header(self._block(i))
        if got is None or got[0].get("kind") != "block" or got[0].get("index") != i:
            return None
        return got

    def load_block(self, i: int) -> tuple[dict[str, torch.Tensor], dict]:
        got = self._block_header(i)
        if got is None:
            raise RuntimeError(f"resume store of {self.name}: block {i} became unreadable while resuming")
        header, start = got
        return read_tensors(self._block(i), header["tensors"], start), header["meta"]

    def restore_stream(self, stream) -> None:
        """Overwrite `stream` (the freshly embedded inputs of block 0) with the stored inputs of
        the block the walk resumes at, one batch at a time."""
        path = self.folder / _STATE
        got = read_header(path)
        info = got[0].get("stream") if got else None
        if info is None:
            raise RuntimeError(f"resume store of {self.name}: the progress record holds no activations")
        header, start = got
        shape, dtype = tuple(info["shape"]), dtype_of(info["dtype"])
        if info["windows"] != len(stream) or shape != stream.window_shape:
            raise RuntimeError(f"resume store of {self.name}: stored activations {info['windows']} x {shape} "
                               f"do not fit the stream {len(stream)} x {stream.window_shape}")
        per_window = torch.empty(shape, dtype=dtype).numel() * torch.empty((), dtype=dtype).element_size()
        step = 8
        for s in range(0, len(stream), step):
            batch = torch.empty(min(step, len(stream) - s), *shape, dtype=dtype)
            read_into(path, start + s * per_window, batch)
            stream.write(s, batch.to(stream.device))


class ResumeStore:
    """The store of one output folder; made by `open_store` while the run holds the folder."""

    def __init__(self, folder: Path, fp: Optional[dict] = None) -> None:
        self.folder, self.fp = folder, fp

    def candidate(self, name: str) -> CandidateStore:
        return CandidateStore(self.folder / _folder_name(name), name, self)

    def ensure(self) -> None:
        """Made with its fingerprint before the first record (a run that fails before any
        block is finished leaves no store)."""
        if not (self.folder / _FINGERPRINT).is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_record(self.folder / _FINGERPRINT, {"kind": "fingerprint", "fingerprint": self.fp})

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def discard_store(out_dir: Path) -> None:
    """A run without --resume starts clean: an earlier run's blocks are dropped."""
    folder = store_dir(out_dir)
    if folder.exists():
        log.info("removing the resume store of an earlier run (%s); use --resume to continue it", folder)
        shutil.rmtree(folder, ignore_errors=True)


def stored_candidates(out_dir: Path, names: list[str]) -> set[str]:
    """The names among `names` with records in the resume store: for preflight, which lets
    `--resume` decide about their folders (a finished artifact is kept, one renamed into place
    just before the kill is rewritten from the stored blocks) once the fingerprint is checked."""
    store = ResumeStore(store_dir(out_dir))
    return {n for n in names if any(store.candidate(n).folder.glob("*.rec"))}


def open_store(out_dir: Path, fp: dict, resume: bool) -> ResumeStore:
    """The store for this run. With `resume`, an earlier store must match `fp` (else
    ConfigError naming the changed input); a missing or torn one means starting from scratch."""
    folder = store_dir(out_dir)
    store = ResumeStore(folder, fp)
    if resume:
        got = read_header(folder / _FINGERPRINT)
        if got is not None and got[0].get("kind") == "fingerprint":
            why = changed_input(got[0]["fingerprint"], fp)
            if why:
                raise ConfigError(f"--resume: {why}; {_AGAIN}")
            log.info("--resume: continuing the interrupted run stored in %s", folder)
            _remove_temporaries(folder)
            return store
        if folder.exists():
            log.warning("--resume: the store in %s has no readable fingerprint; starting from scratch", folder)
        else:
            log.warning("--resume: no resume store in %s; starting from scratch", out_dir)
    store.discard()
    return store


def _remove_temporaries(folder: Path) -> None:
    """Records a killed run was writing (we hold the output lock: nobody else writes here)."""
    for p in folder.rglob(f"{TMP}*"):
        p.unlink(missing_ok=True)
