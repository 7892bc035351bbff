"""The stage list and one `run(cfg)` over a small context object.

load -> calibrate -> quantize+export (per candidate, block streaming) -> evaluate -> report
-> publish. The stage bodies live in `compress.stages`; each is a plain function of the
context (`compress.stages.context.RunContext`) and can be called alone from Python.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from compress.config import ConfigError, RunConfig
from compress.evaluate.memory import PeakMemory, release_freed, rss_bytes
from compress.stages.allocate import stage_allocate
from compress.stages.calibrate import stage_calibrate
from compress.stages.context import CandidateResult, RunContext
from compress.stages.evaluate import stage_evaluate
from compress.stages.export import stage_quantize
from compress.stages.load import stage_load
from compress.stages.publish import stage_publish
from compress.stages.report import stage_report
from compress.stages.quantize import Plan
from compress.lock import holding_output_dir

log = logging.getLogger(__name__)


def preflight(cfg: RunConfig, out_dir: Path, resume: bool = False) -> list[Plan]:
    """Every check that needs no model weights; raises ConfigError naming the key. With
    `resume`, artifacts that the interrupted run finished are not in the way: they are kept."""
    from compress.data.sources import resolve_source
    from compress.paths import unwritable_dir
    from compress.mixed.plan import find_gpu
    from compress.serving import load_gpus
    from compress.stages.quantize import resolve_plans
    from compress.stages.load import check_source
    from compress.sweep import with_sweep

    try:
        plans = resolve_plans(with_sweep(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_source(cfg.model)
    if cfg.executor.kind == "ray":
        from compress.executor.ray_run import require_ray

        require_ray()
    _check_format(cfg, plans)
    _check_gguf_runtime(cfg)
    if problem := unwritable_dir(out_dir):
        raise ConfigError(f"export.output_dir: {problem}")
    try:
        load_gpus(cfg.serving.gpus)  # the report reads it after all the work; fail now instead
        for p in plans:
            if p.q.target is not None and p.q.target.gpu is not None:
                find_gpu(p.q.target.gpu, cfg.serving.gpus)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, spec, field_ in (
        ("calibration.dataset", cfg.calibration.dataset, cfg.calibration.text_field),
        ("evaluate.dataset", cfg.evaluate.dataset, cfg.calibration.text_field),
    ):
        try:
            resolve_source(spec, text_field=field_)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    if not cfg.export.overwrite:
        from compress.resume import stored_candidates

        kept = stored_candidates(out_dir, [p.name for p in plans]) if resume else set()
        for p in plans:
            if p.name not in kept and (out_dir / p.name / "compress-manifest.json").exists():
                raise ConfigError(
                    f"export.output_dir: {out_dir / p.name} already holds an artifact; "
                    "set export.overwrite: true or choose another output_dir"
                )
    return plans


def _check_gguf_runtime(cfg: RunConfig) -> None:
    from compress.evaluate.llamacpp import available

    e = cfg.evaluate
    if e.enabled and e.gguf_runtime == "llama.cpp" and cfg.export.format == "gguf" and not available():
        raise ConfigError(
            "evaluate.gguf_runtime: llama.cpp needs llama-cpp-python, which is not installed "
            "(pip install 'compress[llamacpp]', or set evaluate.gguf_runtime: auto or torch)"
        )


def _check_format(cfg: RunConfig, plans: list[Plan]) -> None:
    """The export format's own limits on the config and, where the source's config.json can be
    read without loading anything, on the model family."""
    from compress.formats.registry import get_format
    from compress.models.checkpoint import CheckpointError
    from compress.stages.load import source_config

    fmt = get_format(cfg.export.format)
    if fmt.name != "gguf":
        for p in plans:
            for k, o in enumerate(p.q.overrides):
                if o.gguf_type is not None:
                    raise ConfigError(f"quantize.overrides.{k}.gguf_type: applies to export.format: gguf only "
                                      f"(format is '{fmt.name}')")
    if problem := fmt.check_config(cfg) or fmt.check_run(cfg.export, plans):
        raise ConfigError(problem)
    for p in plans:
        if p.q.lm_head is not None and (why := fmt.check_head(p.q.lm_head.spec(p.q), cfg.export)):
            which = f" (candidate '{p.name}')" if len(plans) > 1 else ""
            raise ConfigError(f"quantize.lm_head: export.format {fmt.name}: {why}{which}")
        if p.q.embedding is not None and (why := fmt.check_embedding(p.q.embedding.spec(p.q), cfg.export)):
            which = f" (candidate '{p.name}')" if len(plans) > 1 else ""
            raise ConfigError(f"quantize.embedding: export.format {fmt.name}: {why}{which}")
    try:
        config = source_config(cfg.model)
    except CheckpointError:
        return  # the load stage reports it
    if config is not None and (problem := fmt.check_model(config, None)):
        raise ConfigError(problem)


STAGES: list[tuple[str, Callable[[RunContext], None]]] = [
    ("load", stage_load),
    ("calibrate", stage_calibrate),
    ("allocate", stage_allocate),
    ("quantize", stage_quantize),
    ("evaluate", stage_evaluate),
    ("report", stage_report),
    ("publish", stage_publish),
]


def stages_for(cfg: RunConfig) -> list[tuple[str, Callable[[RunContext], None]]]:
    """The stage list; with `executor.kind: ray`, quantize and evaluate become one stage that
    runs each candidate as a Ray task (compress/executor/ray_run.py)."""
    if cfg.executor.kind == "local":
        return STAGES
    from compress.executor.ray_run import stage_ray

    head = [s for s in STAGES if s[0] not in ("quantize", "evaluate")]
    at = [n for n, _ in head].index("allocate") + 1
    return [*head[:at], ("candidates", stage_ray), *head[at:]]


# The report describes the measured stages, so it (and publishing what it describes) runs after.
_AFTER_MEASURE = ("report", "publish")


@holding_output_dir
def run(cfg: RunConfig, out_dir: Optional[Path] = None, resume: bool = False) -> RunContext:
    """Every stage. With `resume`, continue the interrupted run on `out_dir` from its resume
    store (compress/resume.py); without, an old store is discarded."""
    from compress.resume import discard_store, store_dir

    out_dir = Path(out_dir or cfg.export.output_dir)
    plans = preflight(cfg, out_dir, resume)
    if not resume:
        discard_store(out_dir)
    ctx = RunContext(cfg, out_dir, plans, resume=resume)
    ctx.candidates = {p.name: CandidateResult(p) for p in plans}
    out_dir.mkdir(parents=True, exist_ok=True)
    with PeakMemory() as mem:
        ctx.memory = mem
        for name, stage in stages_for(cfg):
            if name in _AFTER_MEASURE:
                continue
            t0 = time.perf_counter()
            log.info("stage %s", name)
            with PeakMemory() as stage_mem:
                stage(ctx)
            ctx.timings[name] = time.perf_counter() - t0
            ctx.stage_peak_mb[name] = stage_mem.peak / 2**20
            release_freed()
            if name == "load":  # runtime + model skeleton; no weights, no tokenizer
                ctx.runtime_rss_mb = rss_bytes() / 2**20
            log.info("stage %s took %.1f s, peak RSS %.0f MB", name, ctx.timings[name], ctx.stage_peak_mb[name])
    stage_report(ctx)
    stage_publish(ctx)
    if not any(r.error for r in ctx.candidates.values()):
        shutil.rmtree(store_dir(out_dir), ignore_errors=True)  # nothing left to resume
    return ctx
