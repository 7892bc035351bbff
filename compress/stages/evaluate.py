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
from compress.evaluate.vocab_stream import ROWS, vocab_metrics

log = logging.getLogger(__name__)


@dataclass
class EvalRow:
    name: str
    perplexity: float
    kl_divergence: Optional[float] = None
    top1_agreement: Optional[float] = None
    extra: dict = field(default_factory=dict)


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

    def ref_head():
        return original.head_slices(ROWS)

    rows = {"original": EvalRow("original", float("nan"), 0.0, 1.0)}  # first in the table
    ref_ppl: Optional[float] = None
    for name, open_model in candidates.items():
        sm = open_model()
        x = head_inputs(sm, eval_ids, name)
        pair = dict(ref_inputs=ref, ref_head=ref_head, ref_softcap=_softcap_of(original)) if cfg.divergence else {}
        st = vocab_metrics(x, lambda: sm.head_slices(ROWS), eval_ids, _softcap_of(sm), **pair)
        rows[name] = EvalRow(name, st.perplexity, st.kl, st.top1)
        if ref_ppl is None:
            ref_ppl = st.ref_perplexity
        del sm, x
        release_freed()
    for name, path in (llama or {}).items():
        from compress.evaluate.llamacpp import evaluate_gguf

        pair = dict(ref_inputs=ref, ref_head=ref_head, ref_softcap=_softcap_of(original)) if cfg.divergence else {}
        st = evaluate_gguf(path, eval_ids, **pair)
        rows[name] = EvalRow(name, st.perplexity, st.kl, st.top1)
        if ref_ppl is None:
            ref_ppl = st.ref_perplexity
    if ref_ppl is None:
        ref_ppl = vocab_metrics(ref, ref_head, eval_ids, _softcap_of(original)).perplexity
    rows["original"].perplexity = ref_ppl
    return rows


def dir_bytes(path: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "*.gguf")) -> int:
    return sum(p.stat().st_size for pat in patterns for p in Path(path).glob(pat))


def stage_evaluate(ctx) -> None:
    """Bytes of every artifact; with `evaluate.enabled`, perplexity, KL and top-1 of the
    original and every candidate on the evaluation windows, and their speed."""
    from compress.data.sources import RANDOM_TOKENS
    from compress.data.windows import windows_sha256
    from compress.evaluate.sanity import check_original
    from compress.evaluate.speed import measure_in_subprocess
    from compress.formats.artifact import open_artifact
    from compress.stages.context import Protocol

    e = ctx.cfg.evaluate
    done = {n: r for n, r in ctx.candidates.items() if r.artifact is not None}
    l = ctx.loaded
    n_params = l.streamed(load_outer=False).n_params  # read off the skeleton: no weights needed
    orig_bytes = dir_bytes(ctx.loaded.root)
    ctx.original.update(bytes=orig_bytes, bits_per_weight=8 * orig_bytes / n_params, params=n_params)
    for r in done.values():
        r.metrics.update(bytes=dir_bytes(r.artifact))
        r.metrics.update(bits_per_weight=8 * r.metrics.bytes / n_params)
    if not e.enabled:
        return
    original = l.streamed()
    eval_ids = ctx.eval_ids
    bos = ctx.eval_bos
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
    runtimes = {n: runtime_of(e, r.artifact) for n, r in done.items()}
    llama = {n: gguf_of(r.artifact) for n, r in done.items() if runtimes[n] == LLAMA}
    cands = {n: (lambda p=r.artifact: open_artifact(p, l.device, l.dtype, dense=True))
             for n, r in done.items() if n not in llama}
    rows = evaluate_streams(original, cands, eval_ids, e, llama)
    ctx.original.update(perplexity=rows["original"].perplexity, kl_divergence=0.0, top1_agreement=1.0,
                        runtime=TORCH)
    if e.dataset != RANDOM_TOKENS:  # random ids are no text: no model predicts them
        vocab = getattr(l.config, "vocab_size", None) or int(eval_ids.max()) + 1
        ctx.sanity = check_original(rows["original"].perplexity, eval_ids, vocab)
        if ctx.sanity["flagged"]:
            log.warning("%s", ctx.sanity["message"])
    for n, r in done.items():
        r.metrics.update(perplexity=rows[n].perplexity, kl_divergence=rows[n].kl_divergence,
                         top1_agreement=rows[n].top1_agreement, runtime=runtimes[n])
    if e.speed:
        from compress.evaluate.llamacpp import speed_in_subprocess

        dev = l.device.type
        ctx.original.update(**measure_in_subprocess(l.root, False, e.speed_prompt_tokens, e.speed_new_tokens, dev))
        for n, r in done.items():
            if n in llama:  # llama.cpp's kernels, the ones a GGUF user runs
                r.metrics.update(**speed_in_subprocess(llama[n], e.speed_prompt_tokens, e.speed_new_tokens))
            else:
                r.metrics.update(**measure_in_subprocess(r.artifact, True, e.speed_prompt_tokens, e.speed_new_tokens, dev))


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
