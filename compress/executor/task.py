"""One candidate, start to finish, as a plain function of plain data: what a Ray task runs.

The driver (compress/executor/ray_run.py) did the shared work once: it resolved the model (a
GGUF is converted into the cache once), drew the calibration and evaluation windows and
streamed the original over the evaluation windows. A task gets the resolved folder's path,
those windows and the original's lm_head inputs, and runs exactly the functions a local run
calls per candidate (`quantize_candidate`, `evaluate_candidate`, `candidate_speed`) with the
same torch thread count, so its safetensors hash as a local run's do.

Nothing here imports Ray: tensors travel as numpy arrays (`to_wire`/`from_wire`, zero-copy out
of Ray's object store on the worker's node) and the rest as JSON-able dicts.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

_WIRE = {"bfloat16": "int16", "float16": "float16", "float32": "float32", "int64": "int64"}


def to_wire(t) -> Optional[dict]:
    """A tensor as {"array": numpy array, "dtype": torch dtype name} (bfloat16 as its int16 bits)."""
    if t is None:
        return None
    import torch

    name = str(t.dtype).replace("torch.", "")
    bits = t.detach().cpu().contiguous()
    if name == "bfloat16":
        bits = bits.view(torch.int16)
    return {"array": bits.numpy(), "dtype": name}


def from_wire(w: Optional[dict]):
    if w is None:
        return None
    import torch

    with warnings.catch_warnings():  # a read-only view of the object store: it is only read
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(w["array"])
    return t.view(torch.bfloat16) if w["dtype"] == "bfloat16" else t


def wire_bytes(w: Optional[dict]) -> int:
    return 0 if w is None else int(w["array"].nbytes)


def where_am_i() -> dict:
    """The node this process runs on: host name, and Ray's node id and IP inside a Ray worker."""
    out = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        import psutil

        out["process_started_at"] = psutil.Process().create_time()
    except ImportError:
        pass
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            out.update(node_id=ctx.get_node_id(), ip=ray.util.get_node_ip_address())
    except ImportError:
        pass
    return out


def compress_location() -> str:
    """Where this process imports compress from: the driver asks a worker (compress/executor/ray_run.py)."""
    import compress

    return str(Path(compress.__file__).resolve())


def run_candidate(job: dict, calib, evals, ref) -> dict:
    """Quantize, export and evaluate the candidate `job` describes; returns its results as
    JSON-able data. A failure of the candidate itself (not of the worker) is returned as
    `error`, so the scheduler does not retry what would fail again."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    started = time.time()
    import torch

    torch.set_num_threads(job["threads"])  # the bytes follow the thread count (compress/resume.py)
    out: dict[str, Any] = {"name": job["name"], "node": where_am_i(), "threads": torch.get_num_threads(),
                           "started_at": started, "phases": {"torch_import": time.perf_counter() - t0}}
    try:
        out.update(_run(job, from_wire(calib), from_wire(evals), from_wire(ref), out["phases"]))
    except Exception as e:  # the candidate failed: recorded, as in a local sweep
        log.exception("candidate %s failed", job["name"])
        out["error"] = f"{type(e).__name__}: {e}"
    out["task_seconds"] = time.perf_counter() - t0
    out["task_cpu_seconds"] = time.process_time() - cpu0
    return out


def _plan(job: dict):
    from compress.quantizers import get_method
    from compress.stages.quantize import Plan

    q = job["plan"]
    return Plan(job["name"], get_method(q["method"]).config.model_validate(q))


def _run(job: dict, calib_ids, eval_ids, ref, phases: dict) -> dict:
    mark = time.perf_counter()
    from compress.config import parse_config
    from compress.resume import ResumeStore
    from compress.stages.context import CalibrationRecord, CandidateResult, RunContext
    from compress.evaluate.llamacpp import RUNTIME as LLAMA, gguf_of
    from compress.stages.evaluate import (
        candidate_speed, evaluate_candidate, evaluate_gguf_candidate, open_candidate, runtime_of,
    )
    from compress.stages.export import quantize_candidate
    from compress.stages.load import open_resolved

    def lap(what: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[what] = phases.get(what, 0.0) + now - mark
        mark = now

    lap("imports")

    cfg = parse_config(job["config"])
    plan = _plan(job)
    out_dir = Path(job["out_dir"])
    ctx = RunContext(cfg, out_dir, [plan], resume=True)
    ctx.loaded = open_resolved(cfg.model, Path(job["root"]), _path(job["tokenizer_dir"]), _path(job["gguf"]))
    ctx.calib_ids, ctx.eval_ids = calib_ids, eval_ids
    ctx.input_hashes = job["input_hashes"]
    ctx.calibration = CalibrationRecord(**job["calibration"]) if job["calibration"] else None
    res = CandidateResult(plan, allocation=job["allocation"])
    # The driver made the store (and discarded an old one unless --resume); a retried task
    # finds the blocks its killed attempt finished there and continues after them.
    store = ResumeStore(Path(job["store"]), job["fingerprint"])
    saved = store.candidate(plan.name)
    before = saved.resume_point(ctx.loaded.streamed(load_outer=False).n_blocks).start if saved.done() is None else None
    lap("open")
    quantize_candidate(ctx, res, saved, job["manifest"])
    lap("quantize")
    got: dict[str, Any] = {
        "artifact": res.artifact.name, "layers": [dataclasses.asdict(r) for r in res.layers],
        "quantize_seconds": res.quantize_seconds, "linear_bits_per_weight": res.metrics.linear_bits_per_weight,
        "resumed_at_block": before or None, "kept_finished": before is None,
    }
    e = cfg.evaluate
    if e.enabled and ref is not None:
        l = ctx.loaded
        runtime = runtime_of(e, res.artifact)  # as the local evaluate stage: a GGUF file in llama.cpp
        if runtime == LLAMA:
            row, ref_row = evaluate_gguf_candidate(plan.name, gguf_of(res.artifact), l.streamed(), ref, eval_ids, e)
        else:
            row, ref_row = evaluate_candidate(plan.name, lambda: open_candidate(res.artifact, l.device, l.dtype),
                                              l.streamed(), ref, eval_ids, e)
        got["evaluation"] = {"perplexity": row.perplexity, "kl_divergence": row.kl_divergence,
                             "top1_agreement": row.top1_agreement, "extra": row.extra, "runtime": runtime,
                             "ref": None if ref_row is None else dataclasses.asdict(ref_row)}
        lap("evaluate")
        if e.speed:
            got["speed"] = candidate_speed(res.artifact, e, l.device.type)
            lap("speed")
    return got


def _path(p: Optional[str]) -> Optional[Path]:
    return None if p is None else Path(p)
