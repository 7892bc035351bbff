"""Stage: evaluate the original and every candidate artifact in one lockstep block walk.

The original is streamed once over the evaluation windows and what its lm_head receives is
kept (one hidden vector per position); each candidate is then streamed the same way and both
heads are read a slice of vocabulary at a time (`compress.evaluate.vocab_stream`), so neither
model's embedding or head table is ever resident and no logits are stored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from compress.config import EvaluateConfig
from compress.engine import StreamedModel
from compress.evaluate.llamacpp import RUNTIME as LLAMA, TORCH, gguf_of
from compress.evaluate.memory import release_freed
from compress.evaluate.stats import quality_stats
from compress.evaluate.vocab_stream import ROWS, vocab_metrics

log = logging.getLogger(__name__)


@dataclass
class EvalRow:
    name: str
    perplexity: float
    kl_divergence: Optional[float] = None
    top1_agreement: Optional[float] = None
    extra: dict = field(default_factory=dict)


def open_candidate(path: Path, device: torch.device, dtype: torch.dtype):
    """A candidate artifact as `evaluate_streams` reads it: a `StreamedModel` of the stored
    codes, or for an ONNX artifact an `OnnxCandidate` (run in ONNX Runtime)."""
    from compress.formats.artifact import open_artifact
    from compress.formats.onnx_format import is_onnx_artifact

    if is_onnx_artifact(path):
        from compress.evaluate.onnx_runtime import OnnxCandidate

        return OnnxCandidate(path)
    return open_artifact(path, device, dtype, dense=True)


def head_inputs(sm: StreamedModel, eval_ids: torch.Tensor, desc: str) -> torch.Tensor:
    """The lm_head's inputs ``[windows, L, H]`` for every evaluation window."""
    with sm.embed(eval_ids) as hidden:
        sm.walk(hidden, lambda i, block, stream: sm.run_block(block, i, stream), f"evaluate {desc}")
        return sm.head_inputs(hidden, eval_ids)


def _softcap_of(sm: StreamedModel) -> Optional[float]:
    return getattr(sm.config, "final_logit_softcapping", None)


def evaluate_streams(
    original: StreamedModel, candidates: dict[str, Callable[[], StreamedModel]],
    eval_ids: torch.Tensor, cfg: EvaluateConfig, llama: Optional[dict[str, Path]] = None,
) -> dict[str, EvalRow]:
    """The original's head inputs are kept (small); candidates are then opened and streamed
    one at a time, so memory holds one block of each model and two sets of head inputs. The
    original's perplexity comes from the first paired pass, which computes its logits anyway;
    only without one does the original get a pass of its own. `llama` names GGUF files run in
    llama.cpp instead (`compress.evaluate.llamacpp`), scored against the same original logits."""
    ref = head_inputs(original, eval_ids, "original")
    rows = {"original": EvalRow("original", float("nan"), 0.0, 1.0)}  # first in the table
    ref_row: Optional[EvalRow] = None
    for name, open_model in candidates.items():
        rows[name], theirs = evaluate_candidate(name, open_model, original, ref, eval_ids, cfg)
        if ref_row is None:
            ref_row = theirs
    for name, path in (llama or {}).items():  # GGUF files run by llama.cpp itself
        rows[name], theirs = evaluate_gguf_candidate(name, path, original, ref, eval_ids, cfg)
        if ref_row is None:
            ref_row = theirs
    rows["original"] = ref_row if ref_row is not None else original_row(original, ref, eval_ids)
    return rows


def evaluate_candidate(name: str, open_model: Callable[[], StreamedModel], original: StreamedModel,
                       ref: torch.Tensor, eval_ids: torch.Tensor, cfg: EvaluateConfig) -> tuple[EvalRow, Optional[EvalRow]]:
    """One candidate against the original's head inputs `ref`: its row, and the original's
    row read off the same paired pass (None without `evaluate.divergence`). A Ray task
    (compress/executor/task.py) calls this too, so both executors compute the same figures."""
    from compress.evaluate.onnx_runtime import OnnxCandidate

    sm = open_model()
    # an ONNX candidate runs in ONNX Runtime
    x = sm.head_inputs(eval_ids) if isinstance(sm, OnnxCandidate) else head_inputs(sm, eval_ids, name)
    pair = dict(ref_inputs=ref, ref_head=lambda: original.head_slices(ROWS),
                ref_softcap=_softcap_of(original)) if cfg.divergence else {}
    st = vocab_metrics(x, lambda: sm.head_slices(ROWS), eval_ids, _softcap_of(sm), **pair)
    del sm, x
    release_freed()
    row = EvalRow(name, st.perplexity, st.kl, st.top1,
                  quality_stats(st.nll, st.kl_tokens, st.same_top1, st.ref_nll).as_metrics())
    ref_row = None
    if st.ref_perplexity is not None:
        extra = quality_stats(st.ref_nll).as_metrics() if st.ref_nll is not None else {}
        ref_row = EvalRow("original", st.ref_perplexity, 0.0, 1.0, extra)
    return row, ref_row


def evaluate_gguf_candidate(name: str, path: Path, original: StreamedModel, ref: torch.Tensor, eval_ids: torch.Tensor,
                            cfg: EvaluateConfig) -> tuple[EvalRow, Optional[EvalRow]]:
    """`evaluate_candidate` for a GGUF file run by llama.cpp itself (`runtime_of` says when),
    scored against the same original head inputs. A Ray task calls this too."""
    from compress.evaluate.llamacpp import evaluate_gguf

    pair = dict(ref_inputs=ref, ref_head=lambda: original.head_slices(ROWS),
                ref_softcap=_softcap_of(original)) if cfg.divergence else {}
    st = evaluate_gguf(path, eval_ids, **pair)
    ref_row = None if st.ref_perplexity is None else EvalRow("original", st.ref_perplexity, 0.0, 1.0)
    return EvalRow(name, st.perplexity, st.kl, st.top1), ref_row


def original_row(original: StreamedModel, ref: torch.Tensor, eval_ids: torch.Tensor) -> EvalRow:
    """The original's row from its own head inputs, where no paired pass gave it."""
    st = vocab_metrics(ref, lambda: original.head_slices(ROWS), eval_ids, _softcap_of(original))
    return EvalRow("original", st.perplexity, 0.0, 1.0, quality_stats(st.nll).as_metrics())


def dir_bytes(path: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "*.gguf", "*.onnx", "*.onnx.data")) -> int:
    return sum(p.stat().st_size for pat in patterns for p in Path(path).glob(pat))


def stage_evaluate(ctx) -> None:
    """Bytes of every artifact; with `evaluate.enabled`, perplexity, KL and top-1 of the
    original and every candidate on the evaluation windows, and their speed."""
    e = ctx.cfg.evaluate
    done = {n: r for n, r in ctx.candidates.items() if r.artifact is not None}
    l = ctx.loaded
    record_sizes(ctx)
    if not e.enabled:
        return
    original = l.streamed()
    set_protocol(ctx)
    runtimes = {n: runtime_of(e, r.artifact) for n, r in done.items()}
    llama = {n: gguf_of(r.artifact) for n, r in done.items() if runtimes[n] == LLAMA}
    cands = {n: (lambda p=r.artifact: open_candidate(p, l.device, l.dtype)) for n, r in done.items() if n not in llama}
    rows = evaluate_streams(original, cands, ctx.eval_ids, e, llama)
    record_original(ctx, rows["original"])
    ctx.original.update(runtime=TORCH)
    for n, r in done.items():
        r.metrics.update(perplexity=rows[n].perplexity, kl_divergence=rows[n].kl_divergence,
                         top1_agreement=rows[n].top1_agreement, runtime=runtimes[n], **rows[n].extra)
    if e.speed:
        record_original_speed(ctx)
        for r in done.values():
            r.metrics.update(**candidate_speed(r.artifact, e, l.device.type))


def record_sizes(ctx) -> None:
    """Bytes on disk and bits per weight of the original and of every finished artifact."""
    l = ctx.loaded
    n_params = l.streamed(load_outer=False).n_params  # read off the skeleton: no weights needed
    orig_bytes = dir_bytes(l.root)
    ctx.original.update(bytes=orig_bytes, bits_per_weight=8 * orig_bytes / n_params, params=n_params)
    for r in ctx.candidates.values():
        if r.artifact is not None:
            r.metrics.update(bytes=dir_bytes(r.artifact))
            r.metrics.update(bits_per_weight=8 * r.metrics.bytes / n_params)


def set_protocol(ctx) -> None:
    """How the evaluation figures are measured (ctx.protocol), from the drawn windows."""
    from compress.data.windows import windows_sha256
    from compress.stages.context import Protocol

    e, eval_ids, bos = ctx.cfg.evaluate, ctx.eval_ids, ctx.eval_bos
    ctx.protocol = Protocol(
        name=f"{e.dataset}-evaluation-split-nonoverlap-{e.windows}x{e.seqlen}" + ("-bos" if bos is not None else ""),
        dataset=e.dataset, split="evaluation", windows=e.windows, seqlen=e.seqlen,
        windows_sha256=windows_sha256(eval_ids),
        description="perplexity = exp(mean next-token NLL) over consecutive non-overlapping "
        "windows cut from the start of the dataset's evaluation split (see calibration/README.md); "
        "KL(original || candidate) and top-1 agreement averaged over every token position."
        + (f" Each window is BOS (token {bos}) + {e.seqlen - 1} tokens of text; BOS is never a "
           "predicted token." if bos is not None else ""),
        bos_token_id=bos,
    )


def record_original(ctx, row: EvalRow) -> None:
    """The original's row, and the sanity check of its perplexity."""
    from compress.data.sources import RANDOM_TOKENS
    from compress.evaluate.sanity import check_original

    e, l = ctx.cfg.evaluate, ctx.loaded
    perplexity = row.perplexity
    ctx.original.update(perplexity=perplexity, kl_divergence=0.0, top1_agreement=1.0, **row.extra)
    if e.dataset != RANDOM_TOKENS:  # random ids are no text: no model predicts them
        vocab = getattr(l.config, "vocab_size", None) or int(ctx.eval_ids.max()) + 1
        ctx.sanity = check_original(perplexity, ctx.eval_ids, vocab)
        if ctx.sanity["flagged"]:
            log.warning("%s", ctx.sanity["message"])


def record_original_speed(ctx) -> None:
    from compress.evaluate.speed import measure_in_subprocess

    e, l = ctx.cfg.evaluate, ctx.loaded
    ctx.original.update(**measure_in_subprocess(l.root, False, e.speed_prompt_tokens, e.speed_new_tokens,
                                                l.device.type))


def candidate_speed(artifact: Path, e: EvaluateConfig, device_type: str) -> dict:
    """Speed where a user would run the artifact: ONNX in ONNX Runtime, the rest in torch's fastest path."""
    from compress.evaluate.speed import measure_in_subprocess
    from compress.formats.onnx_format import is_onnx_artifact

    if runtime_of(e, artifact) == LLAMA:  # llama.cpp's kernels, the ones a GGUF user runs
        from compress.evaluate.llamacpp import speed_in_subprocess

        return speed_in_subprocess(gguf_of(artifact), e.speed_prompt_tokens, e.speed_new_tokens)
    device = "cpu" if is_onnx_artifact(artifact) else device_type  # ONNX: the CPU execution provider
    return measure_in_subprocess(artifact, True, e.speed_prompt_tokens, e.speed_new_tokens, device)


def runtime_of(e: EvaluateConfig, artifact: Path) -> str:
    """Which runtime measures an artifact: llama.cpp for a GGUF file where `evaluate.gguf_runtime`
    allows it and llama-cpp-python is importable, else our torch view."""
    from compress.evaluate.llamacpp import available

    if gguf_of(artifact) is None or e.gguf_runtime == "torch":
        return TORCH
    if available():
        return LLAMA
    if e.gguf_runtime == LLAMA:  # preflight refuses this; an environment changed under the run
        raise RuntimeError("evaluate.gguf_runtime: llama.cpp, but llama_cpp is no longer importable")
    log.warning("llama-cpp-python is not installed: the GGUF artifact %s is evaluated in compress's "
                "torch view (pip install 'compress[llamacpp]' for llama.cpp)", artifact)
    return TORCH
