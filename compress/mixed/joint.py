"""The whole-model KL of whole allocations: every chosen tensor rounded at once.

An allocation sums per-tensor predictions, as if the losses added. They do not quite: on
SmolLM2-135M (ONNX, GPTQ, no group inside its Q4_1 blocks) the sum over-states many 4-bit linears
together and under-states a 4-bit tied table beside them, so at 108-116 MB it chose the 4-bit
table while the allocation with an 8-bit table measures lower KL and perplexity
(`benchmarks/results/joint-table-kl-2026-12-07.md`). The embedding/head option is one choice
among a handful, so each is measured: the best allocation of the linears under the budget left
beside it, every linear and the outer tensors rounded to nearest, one stream per option, in one
block walk over the calibration windows (as `compress.mixed.block_kl` does per block).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from compress.mixed.block_kl import quantized
from compress.quantizers.base import QuantSpec

Rows = Callable[[torch.Tensor], torch.Tensor]


def joint_kl(sm, ids: torch.Tensor, linears: list[dict[str, QuantSpec]], embeddings: list[Optional[Rows]],
             heads: list[Optional[Rows]], spool_dir: Optional[Path] = None) -> list[float]:
    """KL(original || allocation k), mean over every position of the windows `ids`, for each k:
    `linears[k]` the full names of its rounded linears (to nearest on their grids; a linear not
    named stays), `embeddings[k]` / `heads[k]` their rows as stored (None: kept). `sm` is a
    `StreamedModel` with its outer modules loaded; memory: len(linears) + 1 streams."""
    from compress.evaluate.vocab_stream import ROWS, kl_divergences

    prefix = sm.block_prefix
    streams = []
    try:
        streams.append(sm.embed(ids, spool_dir))
        for rows in embeddings:
            streams.append(sm.embed(ids, spool_dir, rows=rows))

        def run(i: int, block: torch.nn.Module, _) -> None:
            sm.run_block(block, i, streams[0])
            inside = f"{prefix}{i}."
            for specs, s in zip(linears, streams[1:]):
                mine = {n[len(inside):]: spec for n, spec in specs.items() if n.startswith(inside)}
                with quantized(block, mine, sm.arch.conv1d):
                    sm.run_block(block, i, s)

        sm.walk(None, run, "joint KL")
        xs = [sm.head_inputs(s, ids) for s in streams]
        for s in streams:
            s.close()
        keep = lambda t: t  # noqa: E731
        kl = kl_divergences(xs[0], xs[1:], lambda: sm.head_slices(ROWS),
                            getattr(sm.config, "final_logit_softcapping", None),
                            weights=[keep if h is None else h for h in heads])
    finally:
        for s in streams:
            s.close()
    return [max(v, 0.0) for v in kl]  # KL >= 0; a negative is float rounding
