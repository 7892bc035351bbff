"""Artifacts streamed back to the driver (`executor.artifacts: stream`), for workers that do not
share the output folder.

On the worker, a candidate runs as in `shared` mode (compress/executor/task.py) but with a
node-local scratch folder as its output folder: the same writer seals the artifact there, the
evaluation and speed measurement read it there, then the task yields its files through Ray's
object store (a streaming generator) in chunks of at most `CHUNK_BYTES`, each file followed by
the sha256 of the bytes sent, the manifest last, and removes the scratch folder. A scratch
folder is made with an owner record (compress/owner.py), so one left by a killed worker is
removed by the next task on that node.

On the driver, a `Receiver` writes the chunks into its own `.NAME.partial-*` folder (with the
driver's owner record), checks every file's size and sha256 as it ends and the whole list
against the manifest, and renames the folder into place as a local writer does. A stream that
breaks (the worker died, a sha256 differs) leaves nothing: the partial folder is removed, and a
worker's death starts the task again from the beginning, up to `executor.max_retries` times.
Each sealed artifact is recorded as done in the driver's resume store, so `--resume` keeps it
(compress/executor/ray_run.py evaluates such a candidate in the driver, which holds its files).
Ray's own retry of a generator task replays it and drops the items the driver already has,
which assumes the replay yields identical bytes; a retry on another node need not, so the
driver retries instead (the task is submitted with `max_retries=0`).

Only one chunk per file is in memory on either side, and Ray's generator backpressure keeps at
most `IN_FLIGHT` chunks per task in the object store.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 2**20
IN_FLIGHT = 2  # chunks a task may have yielded that the driver has not taken yet
SCRATCH = ".compress-stream.partial-"


class StreamError(Exception):
    """A streamed artifact that does not match what the worker said it sent."""


# -- worker ------------------------------------------------------------------------------------
def stream_candidate(job: dict, calib, evals, ref) -> Iterator[dict]:
    """The Ray generator task of one candidate: run it in a scratch folder of this node, then
    yield {"result", "files"} and the files' chunks (`send_folder`)."""
    from compress.executor.task import run_candidate
    from compress.owner import make_partial, sweep_dead
    from compress.resume import ResumeStore, store_dir

    root = Path(tempfile.gettempdir())
    sweep_dead(root, SCRATCH + "*")  # scratch folders of workers killed on this node
    scratch = make_partial(root, SCRATCH)
    try:
        # The resume store lives here too: a retry (perhaps on another node) starts from block 0.
        ResumeStore(store_dir(scratch), job["fingerprint"]).ensure()
        out = run_candidate({**job, "out_dir": str(scratch), "store": str(store_dir(scratch))}, calib, evals, ref)
        if out.get("error"):
            yield {"result": out}
            return
        folder = scratch / out["artifact"]
        files = artifact_files(folder)
        yield {"result": out, "files": files}
        yield from send_folder(folder, files, job["chunk_bytes"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def artifact_files(folder: Path) -> list[list]:
    """[relative path, bytes] of every file of a sealed artifact, its manifest last, so the
    driver writes the manifest last as a writer does."""
    from compress.formats.writer import MANIFEST

    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files.sort(key=lambda rel: rel == MANIFEST)
    return [[rel, (folder / rel).stat().st_size] for rel in files]


def send_folder(folder: Path, files: list[list], chunk_bytes: int) -> Iterator[dict]:
    """Each file as {"data": uint8 array} chunks, then {"end": path, "sha256": of those bytes}."""
    import numpy as np

    for rel, _ in files:
        digest = hashlib.sha256()
        with open(folder / rel, "rb") as f:
            while data := f.read(chunk_bytes):
                digest.update(data)
                yield {"data": np.frombuffer(data, dtype=np.uint8)}
        yield {"end": rel, "sha256": digest.hexdigest()}


# -- driver ------------------------------------------------------------------------------------
class Receiver:
    """One attempt's stream of one candidate, written into `out_dir/.NAME.partial-*`."""

    def __init__(self, out_dir: Path, name: str, overwrite: bool) -> None:
        self.out_dir, self.name, self.overwrite = Path(out_dir), name, overwrite
        self.result: Optional[dict] = None
        self.files: list[list] = []
        self.tmp: Optional[Path] = None
        self.bytes = 0  # artifact bytes received
        self.started = 0.0  # when the first file began
        self._k = 0  # index of the file being received
        self._file: Any = None
        self._digest: Any = None
        self._got = 0
        self._sha: dict[str, str] = {}

    def take(self, item: dict) -> None:
        if self.result is None:
            self._begin(item)
        elif "data" in item:
            self._data(item["data"])
        elif "end" in item:
            self._end(item["end"], item["sha256"])
        else:
            raise StreamError(f"{self.name}: unexpected item {sorted(item)} in the stream")

    @property
    def complete(self) -> bool:
        """The candidate's error, or every file received."""
        return self.result is not None and (bool(self.result.get("error")) or self._k == len(self.files))

    def _begin(self, item: dict) -> None:
        from compress.owner import OWNER, make_partial

        if "result" not in item:
            raise StreamError(f"{self.name}: the stream does not start with the task's result")
        self.result, self.files = item["result"], item.get("files") or []
        for rel, _ in self.files:
            p = Path(rel)
            if p.is_absolute() or ".." in p.parts or not p.parts or rel == OWNER:
                raise StreamError(f"{self.name}: file name '{rel}' is not a path inside the artifact")
        if self.files:
            self.tmp = make_partial(self.out_dir, f".{self.name}.partial-")
            self._open()
        self.started = time.perf_counter()

    def _open(self) -> None:
        rel = self.files[self._k][0]
        (self.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        self._file, self._digest, self._got = open(self.tmp / rel, "wb"), hashlib.sha256(), 0

    def _data(self, data) -> None:
        if self._k >= len(self.files):
            raise StreamError(f"{self.name}: data after the last file")
        rel, size = self.files[self._k]
        if self._got + len(data) > size:
            raise StreamError(f"{self.name}: {rel} is longer than the {size} bytes announced")
        self._file.write(memoryview(data))
        self._digest.update(memoryview(data))
        self._got += len(data)
        self.bytes += len(data)

    def _end(self, rel: str, sha: str) -> None:
        from compress.formats.writer import MANIFEST

        want, size = self.files[self._k] if self._k < len(self.files) else (None, None)
        if rel != want:
            raise StreamError(f"{self.name}: the stream ended {rel}, the file being received is {want}")
        if rel == MANIFEST:  # the last file, as a writer writes it
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        got = self._digest.hexdigest()
        if self._got != size or got != sha:
            raise StreamError(f"{self.name}: {rel} arrived with {self._got} bytes and sha256 {got[:16]}, the worker "
                              f"sent {size} bytes with sha256 {sha[:16]}; refusing the artifact")
        self._sha[rel] = got
        self._k += 1
        if self._k < len(self.files):
            self._open()

    def seal(self) -> Path:
        """Check the files against the manifest (which came last) and rename the folder into place."""
        from compress.formats.writer import MANIFEST, move_into_place
        from compress.owner import OWNER

        final = self.out_dir / self.name
        if self.tmp is None or not self.complete:
            raise StreamError(f"{self.name}: the stream ended after {self._k} of {len(self.files)} file(s)")
        try:
            outputs = json.loads((self.tmp / MANIFEST).read_text())["outputs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StreamError(f"{self.name}: no readable manifest in the stream ({e})") from None
        listed = {rel: info["sha256"] for rel, info in outputs.items()}
        sent = {rel: sha for rel, sha in self._sha.items() if rel != MANIFEST}
        if listed != sent:
            bad = sorted(set(listed.items()) ^ set(sent.items()))[0][0]
            raise StreamError(f"{self.name}: {bad} differs between the manifest and the files streamed")
        (self.tmp / OWNER).unlink()
        move_into_place(self.tmp, final, self.overwrite)
        self.tmp = None
        return final

    def abort(self) -> None:
        """Remove the partial folder; the final path is left untouched."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def collect(ray, submit: Callable[[str], Any], names: list[str], out_dir: Path, overwrite: bool, retries: int,
            lost: Callable[[Exception], str],
            sealed: Optional[Callable[[str, dict], None]] = None) -> dict[str, dict]:
    """Take every candidate's stream as chunks arrive, whichever task sends next; seal each
    artifact when its stream ends, then call `sealed(name, result)` (the driver's resume store
    records it as done, so --resume keeps it). Returns name -> the task's result, with
    `artifact_bytes` (what was streamed) and `attempts`; a candidate whose stream broke gets
    `error`."""
    gens: dict[Any, str] = {}
    recv: dict[str, Receiver] = {}
    tries: dict[str, int] = {}
    outcomes: dict[str, dict] = {}

    def start(name: str) -> None:
        tries[name] = tries.get(name, 0) + 1
        recv[name] = Receiver(out_dir, name, overwrite)
        gens[submit(name)] = name

    def fail(gen, name: str, error: str) -> None:
        recv[name].abort()
        gens.pop(gen, None)
        outcomes[name] = {**(recv[name].result or {"name": name}), "error": error}

    try:
        for name in names:
            start(name)
        while gens:
            ready, _ = ray.wait(list(gens), num_returns=1)
            gen = ready[0]
            name = gens[gen]
            try:
                item = ray.get(next(gen))
            except StopIteration:
                item = None
            except ray.exceptions.RayTaskError as e:  # the streaming code failed, not the worker
                fail(gen, name, f"{type(e.cause).__name__}: {e.cause}" if e.cause else str(e))
            except ray.exceptions.RayError as e:  # the worker died or its node was lost: start again
                recv[name].abort()
                gens.pop(gen)
                log.warning("ray: the worker streaming %s died (%s); attempt %d of %d", name,
                            type(e).__name__, tries[name], retries + 1)
                if tries[name] <= retries:
                    start(name)
                else:
                    outcomes[name] = {"name": name, "error": lost(e)}
            else:
                try:
                    if item is not None:
                        recv[name].take(item)
                    # Done when the last file ended, without waiting for the end of the stream:
                    # that wait (on the task's return) can hang in Ray 2.60 while the other
                    # tasks, paused by backpressure, wait for the driver.
                    if item is None or recv[name].complete:
                        gens.pop(gen)
                        outcomes[name] = _finish(recv[name])
                        if sealed is not None and not outcomes[name].get("error"):
                            sealed(name, outcomes[name])
                except (StreamError, OSError) as e:
                    ray.cancel(gen)  # its scratch folder goes with it (the task's `finally`)
                    fail(gen, name, f"{type(e).__name__}: {e}")
            if name in outcomes:
                outcomes[name]["attempts"] = tries[name]
                log.info("ray: candidate %s %s", name, "failed" if outcomes[name].get("error") else "done")
    finally:  # Ctrl-C too: no partial folder of this process outlives the run
        for r in recv.values():
            r.abort()
    return outcomes


def _finish(r: Receiver) -> dict:
    """The outcome of a stream that ended: the candidate's own error, or its sealed artifact."""
    if r.result is not None and r.result.get("error"):
        return r.result
    r.seal()
    return {**r.result, "artifact_bytes": r.bytes, "stream_seconds": time.perf_counter() - r.started}
