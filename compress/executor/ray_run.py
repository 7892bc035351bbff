"""The candidates of a sweep as Ray tasks (`executor.kind: ray`, `compress compare --ray`).

The driver (this process) has run load, calibrate and allocate, as a local run does. This
stage then streams the original over the evaluation windows once, puts the windows and the
original's lm_head inputs into Ray's object store once, and starts one task per candidate
(compress/executor/task.py) asking for `executor.threads` CPUs, `executor.gpus` GPUs and the
memory the plan needs (compress/executor/resources.py). Artifacts are written by the tasks
into the output folder, which every node must see (`executor.artifacts: shared`), atomically
as in a local run: a worker that dies leaves a `.partial-` folder with its owner record, never
a folder that looks complete. A task whose worker dies is run again up to `max_retries`
times, continuing from the blocks its killed attempt stored (compress/resume.py); after that
the candidate is listed as failed with the reason, and the others complete. With
`executor.artifacts: stream` the tasks send their artifacts back instead and this process
writes them (compress/executor/stream.py).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional

from compress.config import ConfigError

log = logging.getLogger(__name__)

INSTALL = "pip install 'compress[ray]'"


def require_ray(key: str = "executor.kind"):
    """The `ray` module, or ConfigError (exit 2) saying what to install."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"{key}: ray runs candidates on a Ray cluster, and Ray is not installed; "
                          f"install it with: {INSTALL}") from None
    return ray


def connect(ray, address: Optional[str]) -> bool:
    """Join the cluster at `address` ('auto': a running one, else a new one here; 'local': a
    new one here; None: the cluster this process already joined, else as 'auto'). Returns
    whether this call started the connection (and so must end it)."""
    if ray.is_initialized():
        return False
    # A cluster started here inherits this environment; one joined gets this PYTHONPATH
    # as the job's runtime_env.
    env = {"env_vars": {"PYTHONPATH": _absolute(os.environ["PYTHONPATH"])}} if os.environ.get("PYTHONPATH") else None
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True)
    if address in (None, "auto"):
        try:
            ray.init(address="auto", runtime_env=env, **kwargs)
        except ConnectionError:  # none running (or a stale record of one): a new one here
            ray.init(address="local", **kwargs)
    elif address == "local":
        ray.init(address="local", **kwargs)
    else:
        try:
            ray.init(address=address, runtime_env=env, **kwargs)
        except ConnectionError as e:
            raise ConfigError(f"executor.address: cannot reach a Ray cluster at {address} ({e})") from None
    return True


def _absolute(path: str) -> str:
    """A PYTHONPATH with every entry absolute: a worker's working folder need not be ours."""
    return os.pathsep.join(os.path.abspath(p) for p in path.split(os.pathsep) if p)


def worker_env(ray, nodes: list[dict]) -> Optional[dict]:
    """The runtime_env each task needs for its worker to import the compress this process runs.
    None where this job's workers already do, asked of one worker on a one-node cluster (a
    cluster this process started inherits its environment): a task with a runtime_env of its
    own cannot run in the workers Ray started with the cluster and waits for a new process,
    which imports Ray again while the started one idles. Else this process's PYTHONPATH."""
    from compress.executor.task import compress_location

    path = os.environ.get("PYTHONPATH")
    if not path:
        return None
    if len(nodes) == 1 and ray.get(ray.remote(compress_location).remote()) == compress_location():
        return None
    return {"env_vars": {"PYTHONPATH": _absolute(path)}}


def stage_ray(ctx) -> None:
    """Quantize, export and evaluate every candidate as a Ray task; the original's figures here."""
    import torch

    ray = require_ray()
    ex = ctx.cfg.executor
    started = connect(ray, ex.address)
    try:
        _fan_out(ray, ctx, ex.threads or torch.get_num_threads())
    finally:
        if started:
            ray.shutdown()


def _fan_out(ray, ctx, threads: int) -> None:
    from compress.executor.stream import CHUNK_BYTES, collect, stream_candidate
    from compress.executor.task import run_candidate, to_wire, wire_bytes
    from compress.owner import sweep_dead
    from compress.resume import fingerprint, open_store, store_dir
    from compress.stages.evaluate import (
        EvalRow, head_inputs, original_row, record_original, record_original_speed, record_sizes, set_protocol,
    )
    from compress.stages.export import base_manifest, runtime_settings

    cfg, l, ex = ctx.cfg, ctx.loaded, ctx.cfg.executor
    e = cfg.evaluate
    driver: dict[str, float] = {}  # wall seconds of this process's steps, for the executor record
    mark = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        driver[what] = driver.get(what, 0.0) + now - mark
        mark = now

    fp = fingerprint(ctx)
    fp["runtime settings"]["torch_threads"] = threads  # what the tasks run with
    store = open_store(ctx.out_dir, fp, ctx.resume)
    store.ensure()  # once, here: tasks only add their candidate's folder
    manifest = base_manifest(cfg, l, ctx.input_hashes, ctx.calibration)
    manifest["runtime"] = {**runtime_settings(l.device), "torch_threads": threads}
    lap("setup")

    t0 = time.perf_counter()
    ref = original = None
    if e.enabled:
        set_protocol(ctx)
        original = l.streamed()
        ref = head_inputs(original, ctx.eval_ids, "original")
    lap("original")
    shared = {"calibration": to_wire(ctx.calib_ids), "evaluation": to_wire(ctx.eval_ids), "head_inputs": to_wire(ref)}
    shared_bytes = {k: wire_bytes(v) for k, v in shared.items()}
    refs = {k: ray.put(v) for k, v in shared.items()}
    ctx.timings["original"] = time.perf_counter() - t0
    lap("put")

    common = {
        "config": cfg.model_dump(mode="json"), "out_dir": str(ctx.out_dir.resolve()), "root": str(l.root),
        "tokenizer_dir": str(l.tokenizer_dir) if l.tokenizer_dir else None, "gguf": str(l.gguf) if l.gguf else None,
        "input_hashes": ctx.input_hashes, "threads": threads, "store": str(store_dir(ctx.out_dir).resolve()),
        "fingerprint": fp, "manifest": manifest,
        "calibration": None if ctx.calibration is None else _asdict(ctx.calibration),
        "chunk_bytes": CHUNK_BYTES,
    }
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    env = worker_env(ray, nodes)
    stream = ex.artifacts == "stream"
    remote = ray.remote(stream_candidate if stream else run_candidate)
    jobs: dict[str, tuple[dict, dict]] = {}
    tasks: dict[str, dict] = {}
    kept: dict[str, dict] = {}  # streamed candidates an interrupted run finished: evaluated here
    for name, res in ctx.candidates.items():
        if res.error:
            continue
        job = {**common, "name": name, "plan": res.plan.q.model_dump(mode="json"), "allocation": res.allocation}
        if stream and ctx.resume and _finished_here(store.candidate(name), ctx.out_dir / name):
            kept[name] = job
            tasks[name] = {"kept_finished": True, "bytes_to_task": 0}
            continue
        opts = task_options(ctx, res.plan, threads, env)
        check_fits(nodes, opts, name)
        jobs[name] = (job, opts)
        job_bytes = len(json.dumps(job, default=str).encode())
        tasks[name] = {"resources": {k: v for k, v in opts.items() if k in ("num_cpus", "num_gpus", "memory")},
                       "bytes_to_task": job_bytes + sum(shared_bytes.values())}
    lap("jobs")

    def submit(name: str):
        job, opts = jobs[name]
        tasks[name]["submitted_at"] = time.time()
        return remote.options(**opts).remote(job, refs["calibration"], refs["evaluation"], refs["head_inputs"])

    log.info("ray: submitting %d candidate task(s) (%d thread(s) each; shared objects %s)", len(jobs), threads,
             ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in shared_bytes.items()))
    lost = lambda err: _lost(err, ex.max_retries)  # noqa: E731
    if stream:
        def sealed(name: str, out: dict) -> None:  # what --resume keeps (compress/resume.py)
            store.candidate(name).mark_done({"reports": out["layers"], "quantize_seconds": out["quantize_seconds"],
                                             "linear_bits_per_weight": out["linear_bits_per_weight"]})

        outcomes = collect(ray, submit, list(jobs), ctx.out_dir, cfg.export.overwrite, ex.max_retries, lost, sealed)
        for name, job in kept.items():
            outcomes[name] = _evaluate_kept(ctx, job, shared)
    else:
        outcomes = _collect(ray, submit, list(jobs), lost)
    lap("tasks")
    for name, out in outcomes.items():
        tasks[name]["returned_at"] = out.pop("returned_at", None)
        tasks[name]["bytes_from_task"] = len(json.dumps(out, default=str).encode()) + out.get("artifact_bytes", 0)
        if stream and name not in kept:
            tasks[name].update(artifact_bytes=out.get("artifact_bytes", 0), attempts=out.get("attempts"),
                               stream_seconds=out.get("stream_seconds"))
    sweep_dead(ctx.out_dir)  # partial folders of workers that died on this host
    lap("sweep")

    ref_row = None
    for name, res in ctx.candidates.items():
        out = outcomes.get(name)
        if out is None:
            continue
        _apply(ctx, res, out)
        tasks[name].update(node=out.get("node"), threads=out.get("threads"), seconds=out.get("task_seconds"),
                           resumed_at_block=out.get("resumed_at_block"), started_at=out.get("started_at"),
                           cpu_seconds=out.get("task_cpu_seconds"), phases=out.get("phases"))
        if ref_row is None and out.get("evaluation") and out["evaluation"]["ref"] is not None:
            ref_row = EvalRow(**out["evaluation"]["ref"])  # as the local run: the first evaluated candidate's
    ctx.executor = {"kind": "ray", "address": ex.address, "artifacts": ex.artifacts, "threads_per_task": threads,
                    "shared_object_bytes": shared_bytes, "tasks": tasks, "driver_seconds": driver}
    record_sizes(ctx)
    if e.enabled:
        record_original(ctx, ref_row if ref_row is not None else original_row(original, ref, ctx.eval_ids))
        if e.speed:
            record_original_speed(ctx)
    lap("record")


def _finished_here(saved, folder) -> bool:
    """Whether the interrupted run's driver sealed this streamed candidate (its store says so
    and the folder is complete). A record without its folder is dropped: the candidate runs."""
    from compress.formats.writer import is_complete

    if saved.done() is None:
        return False
    if is_complete(folder):
        return True
    log.warning("--resume: %s was finished, but %s is no longer a complete artifact; quantizing it again",
                saved.name, folder)
    saved.discard()
    return False


def _evaluate_kept(ctx, job: dict, shared: dict) -> dict:
    """A streamed candidate kept by --resume: its artifact is here, not on any worker, so this
    process evaluates it, with the task's own function and thread count (its quantization
    is skipped by the store's done record, as in a local resume)."""
    import torch

    from compress.executor.task import run_candidate
    from compress.resume import store_dir

    before = torch.get_num_threads()
    try:
        return run_candidate({**job, "out_dir": str(ctx.out_dir.resolve()), "store": str(store_dir(ctx.out_dir).resolve())},
                             shared["calibration"], shared["evaluation"], shared["head_inputs"])
    finally:
        torch.set_num_threads(before)


def _collect(ray, submit, names: list[str], lost) -> dict[str, dict]:
    """`shared` mode: each task's result as it finishes (Ray retries a task whose worker died)."""
    futures = {submit(name): name for name in names}
    outcomes: dict[str, dict] = {}
    pending = list(futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        name = futures[ready[0]]
        try:
            outcomes[name] = ray.get(ready[0])
        except Exception as err:  # the worker died max_retries + 1 times (or the node was lost)
            outcomes[name] = {"name": name, "error": lost(err)}
        outcomes[name]["returned_at"] = time.time()
        log.info("ray: candidate %s %s", name, "failed" if outcomes[name].get("error") else "done")
    return outcomes


def task_options(ctx, plan, threads: int, env: Optional[dict] = None) -> dict:
    """Ray options of one candidate's task: CPUs, GPUs, memory, retries, and `env` (`worker_env`)."""
    from compress.executor.resources import plan_memory

    ex = ctx.cfg.executor
    device = ctx.loaded.device.type
    gpus = ex.gpus if ex.gpus is not None else (1 if device == "cuda" else 0)
    memory = int(ex.memory_gb * 2**30) if ex.memory_gb else plan_memory(ctx.cfg, ctx.loaded.config, plan, device).request
    opts: dict[str, Any] = dict(num_cpus=threads, num_gpus=gpus, memory=memory, max_retries=ex.max_retries,
                                retry_exceptions=False, name=f"compress:{plan.name}")
    if ex.artifacts == "stream":  # a generator task; the driver retries it (compress/executor/stream.py)
        from compress.executor.stream import IN_FLIGHT

        opts.update(num_returns="streaming", _generator_backpressure_num_objects=IN_FLIGHT, max_retries=0)
    if env is not None:  # the workers import the compress this process runs
        opts["runtime_env"] = env
    return opts


def check_fits(nodes: list[dict], opts: dict, name: str) -> None:
    """A task no node can hold would wait forever: say which request is too large instead."""
    need = {"CPU": ("executor.threads", opts["num_cpus"]), "GPU": ("executor.gpus", opts["num_gpus"]),
            "memory": ("executor.memory_gb", opts["memory"])}
    if any(all(n.get(k, 0) >= v for k, (_, v) in need.items() if v) for n in nodes):
        return
    worst = next(((key, v, k) for k, (key, v) in need.items() if v and not any(n.get(k, 0) >= v for n in nodes)),
                 None)
    if worst is None:
        raise ConfigError(f"executor: candidate {name} asks for {opts['num_cpus']} CPU, {opts['num_gpus']} GPU and "
                          f"{opts['memory'] / 2**30:.2f} GiB together, and no node of the Ray cluster has all three")
    most = max((n.get(worst[2], 0) for n in nodes), default=0)
    unit = (lambda x: f"{x / 2**30:.2f} GiB") if worst[2] == "memory" else (lambda x: f"{x:g}")
    raise ConfigError(f"{worst[0]}: candidate {name} asks for {unit(worst[1])} {worst[2]}, and no node of the "
                      f"Ray cluster has that much (the largest has {unit(most)})")


def _apply(ctx, res, out: dict) -> None:
    from compress.stages.quantize import LayerReport

    node = out.get("node") or {}
    # two Ray nodes may share a host (one machine, several raylets): the node id tells them apart
    res.node = f"{node.get('host')}:{str(node.get('node_id'))[:8]}" if node.get("node_id") else node.get("host")
    if out.get("error"):
        res.error = out["error"]
        return
    res.artifact = ctx.out_dir / out["artifact"]
    res.layers = [LayerReport(**r) for r in out["layers"]]
    res.quantize_seconds = out["quantize_seconds"]
    res.metrics.linear_bits_per_weight = out["linear_bits_per_weight"]
    ev = out.get("evaluation")
    if ev:
        res.metrics.update(perplexity=ev["perplexity"], kl_divergence=ev["kl_divergence"],
                           top1_agreement=ev["top1_agreement"], runtime=ev.get("runtime"), **ev["extra"])
    if out.get("speed"):
        res.metrics.update(**out["speed"])


def _lost(err: Exception, retries: int) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (f"{type(err).__name__}: the Ray worker running this candidate died "
            f"{retries + 1} time(s) (executor.max_retries: {retries}): {first}")


def _asdict(record) -> dict:
    import dataclasses

    return dataclasses.asdict(record)
