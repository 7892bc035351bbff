"""Per-layer sensitivity: the predicted loss of each option of each quantizable linear.

The predictor is GPTQ's proxy objective for the option's round-to-nearest weights,
``tr((W - Q) H (W - Q)^T)`` with ``H = 2/n sum x x^T`` the layer's calibration Hessian
(Frantar et al., 2022, eq. 1; `compress.quantizers.hessian`): twice the mean squared error the
option adds to the layer's output. Summed over layers it is what the allocation minimises;
`benchmarks/mixed_precision.py` measures how well it ranks allocations by whole-model KL.

Measured once per run, over one block walk with the original weights (the inputs of each
block are the float model's), so memory holds one block and its Hessians at a time. With
`reference` options the same walk also measures each block's whole-model KL at them
(`compress.mixed.block_kl`), which the `block_kl` predictor uses to put every block's relative
errors in units of KL. With `head`, the walk's last outputs also give the Hessian of the
lm_head's inputs (the final norm's output over every calibration window), which a head that
rounds by GPTQ is measured against (`compress.mixed.outer`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, NamedTuple, Optional

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


class Measured(NamedTuple):
    losses: dict[str, list[float]]  # slot name -> the predicted loss of each of its options, in order
    energy: dict[str, float]  # slot name -> tr(W H W^T), the loss of quantizing it to zero
    block_kl: Optional[list[float]]  # per block, the whole-model KL with its reference options
    head_hessian: Optional[torch.Tensor]  # H of the lm_head's inputs [hidden, hidden]


def measure(sm, calib_ids: torch.Tensor, options: dict[str, list[Optional[QuantSpec]]],
            spool_dir: Optional[Path] = None, reference: Optional[dict[str, QuantSpec]] = None,
            kl_windows: int = 2, head: bool = False) -> Measured:
    """`options[name]` for every slot (full names) -> the predicted loss of each, in order;
    each layer's output energy; with `reference` (full name -> option), the whole-model KL per
    block when only that block's layers hold their reference options, over the first
    `kl_windows` windows; with `head`, the Hessian of the head's inputs over every window.
    `sm` is a `StreamedModel` with its outer modules loaded; it is used up."""
    from compress.mixed.block_kl import BlockKL
    from compress.stages.passes import block_forward, collect_stats, weight_of
    from compress.stages.quantize import block_linears

    losses: dict[str, list[float]] = {}
    energy: dict[str, float] = {}
    kl = BlockKL(sm, calib_ids[:kl_windows], spool_dir) if reference else None
    head_h = None

    def process(i: int, block: torch.nn.Module, hidden) -> None:
        prefix = f"{sm.block_prefix}{i}."
        names = [n for g in block_linears(block, sm.arch.sequential) for n in g if prefix + n in options]
        if kl is not None:  # before the statistics pass: both need the original weights
            kl.step(i, block, {n: reference[prefix + n] for n in names if prefix + n in reference})
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

    try:
        hidden = sm.embed(calib_ids, spool_dir)
        try:
            if kl is None:  # the block KL's head pass needs the head; the head's Hessian only the final norm
                sm.release_outer(keep_head_path=head)
            sm.walk(hidden, process, "sensitivity")
            if head:  # the walk leaves the last block's outputs in `hidden`
                from compress.stages.head import head_hessian

                head_h = head_hessian(sm, hidden, calib_ids)
        finally:
            hidden.close()
        block_kl = kl.finish() if kl is not None else None
    finally:
        if kl is not None:
            kl.close()
    missing = sorted(set(options) - set(losses))
    if missing:
        raise RuntimeError(f"sensitivity: layers never reached in the block walk: {missing[:3]}")
    return Measured(losses, energy, block_kl, head_h)
