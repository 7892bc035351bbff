"""Per-layer sensitivity: the predicted loss of each option of each quantizable linear.

The predictor is GPTQ's proxy objective for the option's round-to-nearest weights,
``tr((W - Q) H (W - Q)^T)`` with ``H = 2/n sum x x^T`` the layer's calibration Hessian
(Frantar et al., 2022, eq. 1; `compress.quantizers.hessian`): twice the mean squared error the
option adds to the layer's output. Summed over layers it is what the allocation minimises;
`benchmarks/mixed_precision.py` measures how well it ranks allocations by whole-model KL.

Measured once per run, over one block walk with the original weights (the inputs of each
block are the float model's), so memory holds one block and its Hessians at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch

from compress.quantizers.base import QuantSpec
from compress.quantizers.hessian import output_error
from compress.quantizers.rtn import round_to_nearest


def option_losses(W: torch.Tensor, H: torch.Tensor, options: Iterable[Optional[QuantSpec]]) -> list[float]:
    """Predicted loss of each option for weight `W` [out, in]; 0 for None (left in float)."""
    W = W.float()
    out = []
    for spec in options:
        if spec is None:
            out.append(0.0)
            continue
        Q = round_to_nearest(W, spec.grid).dequantize(torch.float32)
        out.append(max(output_error(W, Q, H), 0.0))  # H is PSD; a negative is float rounding
    return out


def measure(sm, calib_ids: torch.Tensor, options: dict[str, list[Optional[QuantSpec]]],
            spool_dir: Optional[Path] = None) -> tuple[dict[str, list[float]], dict[str, float]]:
    """`options[name]` for every slot (full names) -> the predicted loss of each, in order;
    and each layer's output energy ``tr(W H W^T)`` (the loss of quantizing it to zero).
    `sm` is a `StreamedModel` with its outer modules loaded; it is used up."""
    from compress.stages.passes import block_forward, collect_stats, weight_of
    from compress.stages.quantize import block_linears

    losses: dict[str, list[float]] = {}
    energy: dict[str, float] = {}

    def process(i: int, block: torch.nn.Module, hidden) -> None:
        prefix = f"{sm.block_prefix}{i}."
        names = [n for g in block_linears(block, sm.arch.sequential) for n in g if prefix + n in options]
        # No early stop: the forward writes the block's outputs over its inputs for the next block.
        stats = collect_stats(sm, block, names, hidden, torch.float32, False, block_forward(sm, block, i),
                              where=f"{sm.block_prefix}{i}", kind="hessian")
        for n in names:
            W = weight_of(block.get_submodule(n), sm.arch.conv1d)
            H = stats[n]
            if not torch.isfinite(H).all():
                raise ValueError(f"layer '{prefix + n}': calibration inputs produced NaN or Inf (Hessian)")
            losses[prefix + n] = option_losses(W, H, options[prefix + n])
            energy[prefix + n] = output_error(W.float(), torch.zeros_like(W, dtype=torch.float32), H)
        stats.clear()

    hidden = sm.embed(calib_ids, spool_dir)
    try:
        sm.release_outer()
        sm.walk(hidden, process, "sensitivity")
    finally:
        hidden.close()
    missing = sorted(set(options) - set(losses))
    if missing:
        raise RuntimeError(f"sensitivity: layers never reached in the block walk: {missing[:3]}")
    return losses, energy
