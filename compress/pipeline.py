"""The stage list and one `run(cfg)` over a small context object.

load -> calibrate -> quantize+export (per candidate, block streaming) -> evaluate -> report.
Every stage is a plain function of the context and can be called alone from Python.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from compress.config import ConfigError, RunConfig
from compress.evaluate.memory import PeakMemory, release_freed, rss_bytes
from compress.stages.load import LoadedModel
from compress.stages.quantize import LayerReport, Plan

log = logging.getLogger(__name__)


@dataclass
class CandidateResult:
    plan: Plan
    artifact: Optional[Path] = None
    layers: list[LayerReport] = field(default_factory=list)
    quantize_seconds: Optional[float] = None
    error: Optional[str] = None
    metrics: dict = field(default_factory=dict)


@dataclass
class RunContext:
    cfg: RunConfig
    out_dir: Path
    plans: list[Plan] = field(default_factory=list)
    loaded: Optional[LoadedModel] = None
    calib_ids: Optional[torch.Tensor] = None
    eval_ids: Optional[torch.Tensor] = None
    calibration: Optional[dict] = None
    input_hashes: dict = field(default_factory=dict)
    candidates: dict[str, CandidateResult] = field(default_factory=dict)
    original: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    stage_peak_mb: dict[str, float] = field(default_factory=dict)
    runtime_rss_mb: Optional[float] = None
    published: object = None
    memory: Optional[PeakMemory] = None


def preflight(cfg: RunConfig, out_dir: Path) -> list[Plan]:
    """Every check that needs no model weights; raises ConfigError naming the key."""
    from compress.data.sources import resolve_source
    from compress.paths import unwritable_dir
    from compress.serving import load_gpus
    from compress.stages.quantize import resolve_plans
    from compress.stages.load import check_source
    from compress.sweep import with_sweep

    try:
        plans = resolve_plans(with_sweep(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_source(cfg.model)
    if problem := unwritable_dir(out_dir):
        raise ConfigError(f"export.output_dir: {problem}")
    try:
        load_gpus(cfg.serving.gpus)  # the report reads it after all the work; fail now instead
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
        for p in plans:
            if (out_dir / p.name / "compress-manifest.json").exists():
                raise ConfigError(
                    f"export.output_dir: {out_dir / p.name} already holds an artifact; "
                    "set export.overwrite: true or choose another output_dir"
                )
    return plans


def stage_load(ctx: RunContext) -> None:
    from compress.hashing import sha256_file
    from compress.stages.load import load_model

    ctx.loaded = load_model(ctx.cfg.model)
    ctx.input_hashes = {p.name: sha256_file(p) for p in ctx.loaded.checkpoint.files}
    _check_group_sizes(ctx, ctx.loaded.streamed(load_outer=False))


def _group_size_error(sm, plan: Plan) -> Optional[str]:
    """The first layer whose input size the plan's group size does not divide, as a message."""
    from compress.stages.passes import weight_of
    from compress.stages.quantize import block_linears, layer_spec

    for i in range(sm.n_blocks):
        for name in (n for g in block_linears(sm.templates[i], sm.arch.sequential) for n in g):
            full = f"{sm.block_prefix}{i}.{name}"
            spec = layer_spec(plan.q, full)
            if spec is None:
                continue
            try:
                spec.check_divides(weight_of(sm.templates[i].get_submodule(name), sm.arch.conv1d).shape[1], full)
            except ValueError as e:
                return str(e)
    return None


def _check_group_sizes(ctx: RunContext, sm) -> None:
    """Group sizes that do not divide a layer fail here, before any data is processed: the run
    stops when it has one candidate, else the candidate is marked failed and the rest go on."""
    for p in ctx.plans:
        err = _group_size_error(sm, p)
        if err and len(ctx.plans) == 1:
            raise ConfigError(err)
        if err:
            ctx.candidates[p.name].error = err


def stage_calibrate(ctx: RunContext) -> None:
    """Token windows for calibration (when a method needs statistics) and for evaluation, drawn
    in a child process (compress/data/draw.py): this process never holds the tokenizer or the
    text. Evaluation's windows are drawn here too, so a too-short evaluation split fails
    before any quantization."""
    from compress.data.draw import draw_windows
    from compress.data.windows import windows_sha256
    from compress.quantizers import get_quantizer

    c, e = ctx.cfg.calibration, ctx.cfg.evaluate
    needs_calib = any(get_quantizer(p.q.method).needs_hessian for p in ctx.plans)
    calib = dict(source_spec=c.dataset, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed,
                 chat_template=c.chat_template) if needs_calib else None
    evaluation = dict(source_spec=e.dataset, n_windows=e.windows, seqlen=e.seqlen) if e.enabled else None
    ctx.calibration = None  # RTN only: no calibration data is read
    if calib is None and evaluation is None:
        return
    drawn = draw_windows(ctx.loaded.root, calib, evaluation, ctx.cfg.model.trust_remote_code)
    ctx.eval_ids = drawn.get("evaluation")
    if calib is None:
        return
    ctx.calib_ids = drawn["calibration"]
    ctx.calibration = {
        "dataset": c.dataset, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed,
        "chat_template": c.chat_template, "windows_sha256": windows_sha256(ctx.calib_ids),
    }


def _spool_dir(ctx: RunContext) -> Optional[Path]:
    """Where the calibration activations are spooled between blocks; None keeps them in memory."""
    mode = ctx.cfg.calibration.activations
    if mode == "auto":
        mode = "memory" if ctx.loaded.device.type == "cuda" else "disk"
    return ctx.out_dir if mode == "disk" else None


def stage_quantize(ctx: RunContext) -> None:
    from compress.stages.export import GPTQExporter, base_manifest
    from compress.stages.quantize import quantize_model

    manifest = base_manifest(ctx.cfg, ctx.loaded, ctx.input_hashes, ctx.calibration)
    for name, res in ctx.candidates.items():
        if res.error:
            continue
        sm = ctx.loaded.streamed()
        exporter = None
        t0 = time.perf_counter()
        try:
            exporter = GPTQExporter(ctx.loaded, sm, res.plan, ctx.cfg, ctx.out_dir / name)
            res.layers = quantize_model(sm, res.plan, ctx.calib_ids, exporter.add_block, _spool_dir(ctx))
            res.quantize_seconds = time.perf_counter() - t0
            res.artifact = exporter.finish(manifest)
            res.metrics["linear_bits_per_weight"] = exporter.linear_bits_per_weight
        except BaseException as e:  # Ctrl-C too: no temporary folder may outlive the run
            if exporter is not None:
                exporter.abort()
            if len(ctx.candidates) == 1 or not isinstance(e, Exception):
                raise
            log.exception("candidate %s failed", name)
            res.error = f"{type(e).__name__}: {e}"
        finally:
            sm = exporter = None  # this candidate's model and buffers go before the next
            release_freed()


def stage_evaluate(ctx: RunContext) -> None:
    from compress.data.windows import windows_sha256
    from compress.evaluate.speed import measure_in_subprocess
    from compress.formats.artifact import open_artifact
    from compress.stages.evaluate import dir_bytes, evaluate_streams

    e = ctx.cfg.evaluate
    done = {n: r for n, r in ctx.candidates.items() if r.artifact is not None}
    l = ctx.loaded
    n_params = l.streamed(load_outer=False).n_params  # read off the skeleton: no weights needed
    orig_bytes = dir_bytes(ctx.loaded.root)
    ctx.original = {"bytes": orig_bytes, "bits_per_weight": 8 * orig_bytes / n_params, "params": n_params}
    for r in done.values():
        r.metrics["bytes"] = dir_bytes(r.artifact)
        r.metrics["bits_per_weight"] = 8 * r.metrics["bytes"] / n_params
    if not e.enabled:
        return
    original = l.streamed()
    eval_ids = ctx.eval_ids
    ctx.protocol = {
        "name": f"{e.dataset}-evaluation-split-nonoverlap-{e.windows}x{e.seqlen}",
        "dataset": e.dataset, "split": "evaluation", "windows": e.windows, "seqlen": e.seqlen,
        "windows_sha256": windows_sha256(eval_ids),
        "description": "perplexity = exp(mean next-token NLL) over consecutive non-overlapping "
        "windows cut from the start of the dataset's evaluation split (see calibration/README.md); "
        "KL(original || candidate) and top-1 agreement averaged over every token position.",
    }
    cands = {n: (lambda p=r.artifact: open_artifact(p, l.device, l.dtype, dense=True)) for n, r in done.items()}
    rows = evaluate_streams(original, cands, eval_ids, e)
    ctx.original.update(perplexity=rows["original"].perplexity, kl_divergence=0.0, top1_agreement=1.0)
    for n, r in done.items():
        r.metrics.update(perplexity=rows[n].perplexity, kl_divergence=rows[n].kl_divergence,
                         top1_agreement=rows[n].top1_agreement)
    if e.speed:
        dev = l.device.type
        ctx.original.update(measure_in_subprocess(l.root, False, e.speed_prompt_tokens, e.speed_new_tokens, dev))
        for r in done.values():
            r.metrics.update(measure_in_subprocess(r.artifact, True, e.speed_prompt_tokens, e.speed_new_tokens, dev))


def stage_report(ctx: RunContext) -> None:
    from compress.stages.report import write_report

    write_report(ctx)


def stage_publish(ctx: RunContext) -> None:
    """Publish one artifact: `publish.candidate`, the only one, or the recommended one."""
    from compress.compare import recommend
    from compress.publish import publish_stage
    from compress.stages.report import rows_of

    pub = ctx.cfg.publish
    if pub is None:
        return
    done = {n: r for n, r in ctx.candidates.items() if r.artifact is not None}
    name = pub.candidate
    if name is None:
        if len(done) == 1:
            name = next(iter(done))
        else:
            rows = rows_of(ctx)
            name = recommend(rows[1:], rows[0], ctx.cfg.select).name
    if name not in done:
        raise RuntimeError(f"publish: candidate '{name}' has no finished artifact to publish")
    ctx.published = publish_stage(done[name].artifact, pub)
    log.info("published %s to %s (%s)", name, pub.to, pub.revision)


STAGES: list[tuple[str, Callable[[RunContext], None]]] = [
    ("load", stage_load),
    ("calibrate", stage_calibrate),
    ("quantize", stage_quantize),
    ("evaluate", stage_evaluate),
    ("report", stage_report),
    ("publish", stage_publish),
]


# The report describes the measured stages, so it (and publishing what it describes) runs after.
_AFTER_MEASURE = ("report", "publish")


def run(cfg: RunConfig, out_dir: Optional[Path] = None) -> RunContext:
    out_dir = Path(out_dir or cfg.export.output_dir)
    plans = preflight(cfg, out_dir)
    ctx = RunContext(cfg, out_dir, plans)
    ctx.candidates = {p.name: CandidateResult(p) for p in plans}
    out_dir.mkdir(parents=True, exist_ok=True)
    with PeakMemory() as mem:
        ctx.memory = mem
        for name, stage in STAGES:
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
    return ctx
