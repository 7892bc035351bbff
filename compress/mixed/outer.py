"""Sensitivity of the tensors outside the blocks: the whole-model KL when only the input
embedding, or only the lm_head, is quantized as the export will round it, measured directly.

The embedding and the head are the largest single tensors of a small model (SmolLM2-135M's tied
49152 x 576 table is 56.6 of the 99.8 MB of a W3 g64 artifact), so a byte budget must be able to
spend less on them. Their predicted loss is in units of KL, as `block_kl`'s and `fisher`'s are,
so the allocation adds it to the linears' (`compress.stages.allocate`).

One block walk over a few calibration windows: stream 0 from the original embedding, one stream
per embedding option from its rounded rows (`StreamedModel.embed(rows=...)`, which rounds only
the rows the windows look up: groups run along the hidden size, and GPTQ's rows are independent
given the Hessian, so that is the table's rounding);
every block loaded once and run over every stream. Then the head pass, a vocabulary slice at a
time (`compress.evaluate.vocab_stream.kl_divergences`): each embedding stream's logits through
the float head, and the original stream's through each head option's rounded rows, against the
original's. Memory: one block, and 1 + options streams of windows x seqlen x hidden floats.

A head rounded by GPTQ (`quantize.lm_head.rounding`, the default of a calibrated method) is
measured so too (`gptq_rows`, against the Hessian of the head's inputs over the calibration
windows), and so is a table shared with it: round to nearest would overstate its loss (3x for
SmolLM2's 4-bit g64 head) and keep the allocation away from the smaller tables.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch

from compress.quantizers.base import QuantSpec
from compress.quantizers.rtn import round_to_nearest

Rows = Callable[[torch.Tensor], torch.Tensor]  # rows [n, hidden] -> the same rows on a grid, dequantized


def rounded(rows: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`rows` [n, hidden] on `spec`'s grid, round to nearest, dequantized in their dtype."""
    return round_to_nearest(rows.float(), spec).dequantize(torch.float32).to(rows.dtype)


def gptq_rows(hessian: torch.Tensor, spec) -> Rows:
    """Rows rounded by GPTQ against `hessian` (the head's inputs'), `spec` a `GPTQSpec`, by the
    exporter's `stages.head.SliceRounder`: factorised once, its fallback to nearest included."""
    from compress.stages.head import SliceRounder

    rounder = SliceRounder(spec.grid, "lm_head", hessian, spec)
    return lambda t: rounder(t.float()).dequantize(torch.float32).to(t.dtype)


def outer_kl(sm, ids: torch.Tensor, embeddings: list[Union[QuantSpec, Rows]], heads: list[Union[QuantSpec, Rows]],
             spool_dir: Optional[Path] = None) -> tuple[list[float], list[float]]:
    """KL(original || only the embedding rounded as each of `embeddings`) and KL(original || only
    the head rounded as each of `heads`), mean over every position of the windows `ids`; an
    option is a grid (round to nearest) or a `Rows` function. `sm` is a `StreamedModel` with its
    outer modules loaded."""
    from compress.evaluate.vocab_stream import ROWS, kl_divergences

    as_rows = lambda o: o if callable(o) else (lambda t: rounded(t, o))  # noqa: E731
    embeddings, heads = [as_rows(o) for o in embeddings], [as_rows(o) for o in heads]
    streams = []
    try:
        streams.append(sm.embed(ids, spool_dir))
        for f in embeddings:
            streams.append(sm.embed(ids, spool_dir, rows=f))

        def run(i: int, block: torch.nn.Module, _) -> None:
            for s in streams:
                sm.run_block(block, i, s)

        sm.walk(None, run, "outer sensitivity")
        xs = [sm.head_inputs(s, ids) for s in streams]
        for s in streams:
            s.close()
        softcap = getattr(sm.config, "final_logit_softcapping", None)
        head = lambda: sm.head_slices(ROWS)  # noqa: E731
        emb_kl = kl_divergences(xs[0], xs[1:], head, softcap) if embeddings else []
        head_kl = kl_divergences(xs[0], [xs[0]] * len(heads), head, softcap,
                                 weights=heads) if heads else []
    finally:
        for s in streams:
            s.close()
    # KL >= 0; a negative is float rounding
    return [max(v, 0.0) for v in emb_kl], [max(v, 0.0) for v in head_kl]
