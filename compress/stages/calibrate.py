"""Stage: token windows for calibration and evaluation, and where activations wait between blocks."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from compress.stages.context import RunContext

log = logging.getLogger(__name__)


def stage_calibrate(ctx: "RunContext") -> None:
    """Token windows for calibration (when a method reads the calibration stream) and for
    evaluation, drawn in a child process (compress/data/draw.py): this process never holds the
    tokenizer or the text. Evaluation's windows are drawn here too, so a too-short evaluation
    split fails before any quantization."""
    from compress.data.draw import draw_windows
    from compress.data.windows import windows_sha256
    from compress.quantizers import get_method
    from compress.stages.context import CalibrationRecord

    c, e = ctx.cfg.calibration, ctx.cfg.evaluate
    # A quantize.target measures every layer's sensitivity on the calibration stream.
    needs_calib = any(get_method(p.q.method).needs_calibration or p.q.target is not None for p in ctx.plans)
    split = calibration_split(ctx.cfg)
    calib = dict(source_spec=c.dataset, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed,
                 chat_template=c.chat_template, split=split, bos=c.bos) if needs_calib else None
    evaluation = dict(source_spec=e.dataset, n_windows=e.windows, seqlen=e.seqlen, bos=e.bos) if e.enabled else None
    ctx.calibration = None  # RTN only: no calibration data is read
    if calib is None and evaluation is None:
        return
    l = ctx.loaded
    # A tokenizer taken from elsewhere for a GGUF model is checked against the GGUF's vocabulary
    # (the GGUF's own was checked when it was converted).
    gguf = l.gguf if l.tokenizer_dir is not None else None
    drawn = draw_windows(l.tokenizer_root, calib, evaluation, ctx.cfg.model.trust_remote_code, ctx.out_dir, gguf)
    ctx.eval_ids = drawn.get("evaluation")
    if "evaluation_bos" in drawn:
        ctx.eval_bos = _bos(drawn["evaluation_bos"])
    if calib is None:
        return
    ctx.calib_ids = drawn["calibration"]
    documents, tokens = (int(v) for v in drawn["calibration_text"])
    ctx.calibration = CalibrationRecord(c.dataset, c.nsamples, c.seqlen, c.seed, c.chat_template,
                                        windows_sha256(ctx.calib_ids), split, documents, tokens,
                                        _bos(drawn["calibration_bos"]))
    if documents:
        held = " (the documents not held out for evaluation; calibration.split)" if split == "calibration" else ""
        log.info("calibration: %d windows of %d tokens drawn from %s documents (%s tokens) of %s%s",
                 c.nsamples, c.seqlen, f"{documents:,}", f"{tokens:,}", c.dataset, held)


def calibration_split(cfg) -> str:
    """The documents calibration draws from: "calibration" (the hash split's share that is not
    evaluation's) or "all". `auto` holds the evaluation share out only when evaluation reads
    the same source, so a user's own calibration file is used whole."""
    from compress.data.sources import resolve_source

    mode = cfg.calibration.split
    if mode != "auto":
        return "all" if mode == "all" else "calibration"
    if not cfg.evaluate.enabled:
        return "all"
    field_ = cfg.calibration.text_field
    same = resolve_source(cfg.calibration.dataset, text_field=field_).same_text(
        resolve_source(cfg.evaluate.dataset, text_field=field_))
    return "calibration" if same else "all"


def _bos(t) -> Optional[int]:
    return None if int(t) < 0 else int(t)


def spool_dir(ctx: "RunContext") -> Optional[Path]:
    """Where the calibration activations are spooled between blocks; None keeps them in memory."""
    mode = ctx.cfg.calibration.activations
    if mode == "auto":
        mode = "memory" if ctx.loaded.device.type == "cuda" else "disk"
    return ctx.out_dir if mode == "disk" else None
