"""Stage: quantize every decoder block, one block at a time.

Input capture, Hessian accumulation and module swapping live here; the algorithms in
`compress.quantizers` only see tensors. Inside a block, linears are quantized in the
architecture's sequential groups (attention inputs, attention output, MLP inputs, MLP output);
with `quantize.propagate` each group's Hessian is collected from the outputs of the already
quantized groups, and the next block receives the quantized block's outputs.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from compress.activations import WindowStream
from compress.config import QuantizeConfig, RunConfig
from compress.engine import StreamedModel
from compress.formats.qweight import QuantizedWeight
from compress.evaluate.memory import trim_heap
from compress.progress import progress
from compress.quantizers import QuantSpec, get_quantizer
from compress.quantizers.hessian import output_error
from compress.stages.passes import (
    block_forward, collect_hessians, mlp_chain, mlp_forward, split_matches, weight_of,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """One candidate: a name and its fully resolved `quantize` settings."""

    name: str
    q: QuantizeConfig


def candidate_name(q: QuantizeConfig) -> str:
    gs = "ch" if q.group_size == -1 else f"g{q.group_size}"  # per output channel: "ch"
    name = f"{q.method}-w{q.bits}-{gs}"
    if not q.sym:
        name += "-asym"
    if q.method == "gptq" and q.desc_act and not q.static_groups:
        name += "-act"  # a permuted g_idx in the file
    return name


def resolve_plans(cfg: RunConfig) -> list[Plan]:
    """The candidates of a run: `candidates:` entries applied over `quantize:`, or just it."""
    if not cfg.candidates:
        return [Plan(candidate_name(cfg.quantize), cfg.quantize)]
    plans = []
    for c in cfg.candidates:
        changes = c.model_dump(exclude_none=True, exclude={"name"})
        q = cfg.quantize.model_copy(update=changes)
        plans.append(Plan(c.name or candidate_name(q), q))
    names = [p.name for p in plans]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"candidates: two candidates resolve to the same name {dup}; give them names")
    return plans


def layer_spec(q: QuantizeConfig, name: str) -> Optional[QuantSpec]:
    """Settings for linear `name` after `skip` and `overrides`, or None to keep it unquantized."""
    if any(re.search(p, name) for p in q.skip):
        return None
    bits, gs, sym = q.bits, q.group_size, q.sym
    for o in q.overrides:  # later overrides win
        if re.search(o.pattern, name):
            if o.skip:
                return None
            bits = o.bits if o.bits is not None else bits
            gs = o.group_size if o.group_size is not None else gs
            sym = o.sym if o.sym is not None else sym
    return QuantSpec(
        bits=bits, group_size=gs, sym=sym, damp_percent=q.damp_percent, block_size=q.block_size,
        desc_act=q.desc_act, static_groups=q.static_groups, mse_clip=q.mse_clip,
    )


@dataclass
class LayerReport:
    name: str
    bits: int
    group_size: int
    method: str  # the method actually used (an RTN fallback shows here)
    weight_rel_error: float
    output_rel_error: Optional[float]
    seconds: float


def block_linears(block: nn.Module, groups: tuple[tuple[str, ...], ...]) -> list[list[str]]:
    """The block's linears in quantization order; unlisted linears come last."""
    from transformers.pytorch_utils import Conv1D

    present = {n for n, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    ordered = [[n for n in g if n in present] for g in groups]
    seen = {n for g in ordered for n in g}
    rest = sorted(present - seen)
    return [g for g in ordered if g] + ([rest] if rest else [])


def set_weight(module: nn.Module, W: torch.Tensor, conv1d: bool) -> None:
    W = W.t() if conv1d else W
    module.weight.data.copy_(W.to(module.weight.dtype))


def _quantize_layer(
    name: str, W: torch.Tensor, H: Optional[torch.Tensor], spec: QuantSpec, method: str
) -> tuple[QuantizedWeight, LayerReport]:
    from compress.quantizers.gptq import GPTQNumericalError

    t0 = time.perf_counter()
    used = method
    if not torch.isfinite(W).all():
        raise ValueError(f"layer '{name}': weights contain NaN or Inf")
    if H is not None and not torch.isfinite(H).all():
        raise ValueError(f"layer '{name}': calibration inputs produced NaN or Inf")
    try:
        qw = get_quantizer(method).quantize_weight(W, H, spec)
    except GPTQNumericalError as e:
        log.warning(
            "layer '%s': %s; falling back to RTN for this layer (raise quantize.damp_percent "
            "or add calibration samples to avoid this)", name, e,
        )
        used = "rtn-fallback"
        qw = get_quantizer("rtn").quantize_weight(W, None, spec)
    Wq = qw.dequantize(torch.float32)
    if not torch.isfinite(Wq).all():
        raise ValueError(f"layer '{name}': quantized weights contain NaN or Inf")
    Wf = W.float()
    w_err = float((Wf - Wq).pow(2).sum() / Wf.pow(2).sum().clamp_min(1e-30))
    o_err = None
    if H is not None:
        o_err = output_error(Wf, Wq, H) / max(output_error(Wf, torch.zeros_like(Wf), H), 1e-30)
    rep = LayerReport(name, spec.bits, spec.group_size, used, w_err, o_err, time.perf_counter() - t0)
    return qw, rep


BlockSink = Callable[[int, nn.Module, dict[str, QuantizedWeight]], None]


def quantize_model(
    sm: StreamedModel, plan: Plan, calib_ids: Optional[torch.Tensor], sink: BlockSink,
    spool_dir: Optional[Path] = None,
) -> list[LayerReport]:
    """Quantize block by block; `sink(i, block, qweights)` receives each finished block.

    `sm` is used up: its outer modules are released once the calibration windows are embedded.
    With `spool_dir`, the calibration activations between blocks live in a temporary file
    there instead of in memory (`WindowStream`).

    The block handed to the sink holds the fake-quantized (dequantized) weights in its linears.
    """
    q = plan.q
    hidden = None
    if get_quantizer(q.method).needs_hessian:
        if calib_ids is None:
            raise ValueError(f"quantize.method: {q.method} needs calibration data")
        hidden = sm.embed(calib_ids, spool_dir)
    try:
        return _quantize_blocks(sm, plan, hidden, sink)
    finally:
        if hidden is not None:
            hidden.close()


def _quantize_blocks(
    sm: StreamedModel, plan: Plan, hidden: Optional[WindowStream], sink: BlockSink
) -> list[LayerReport]:
    q = plan.q
    hdtype = torch.float64 if q.hessian_dtype == "float64" else torch.float32
    sm.release_outer()  # the sink (exporter) took its copy of them when it was created
    chain = mlp_chain(sm) if hidden is not None and q.propagate else ()
    reports: list[LayerReport] = []
    for i in progress(range(sm.n_blocks), desc=f"quantize {plan.name}", unit="block"):
        block = sm.load_block(i)
        groups = block_linears(block, sm.arch.sequential)
        if chain and i == 0 and not split_matches(sm, block, i, chain, hidden.read(0, sm.batch_size)):
            log.warning("the %s blocks' MLP half did not reproduce the block's output; running the "
                        "whole block for every group instead (slower, same result)", sm.arch.family)
            chain = ()
        mlp_from = _mlp_start(groups, chain)
        qweights: dict[str, QuantizedWeight] = {}
        hessians: dict[str, torch.Tensor] = {}
        where = f"{sm.block_prefix}{i}"
        whole = block_forward(sm, block, i)
        if hidden is not None and not q.propagate:
            # One pass with the original weights gives every Hessian and the next inputs.
            names = [n for g in groups for n in g]
            hessians = collect_hessians(sm, block, names, hidden, hdtype, False, whole, where=where)
        for g, group in enumerate(groups):
            if hidden is not None and q.propagate:
                if mlp_from is None or g < mlp_from:
                    hessians = collect_hessians(sm, block, group, hidden, hdtype, True, whole, where=where)
                elif g == mlp_from:  # the attention half is final: h replaces the block inputs
                    hessians = collect_hessians(sm, block, group, hidden, hdtype, True, whole,
                                                capture=chain[0], where=where)
                else:
                    hessians = collect_hessians(sm, block, group, hidden, hdtype, True,
                                                mlp_forward(sm, block, chain), where=where)
            if hidden is not None:
                # The forward's freed temporaries would otherwise stay resident under GPTQ's.
                trim_heap()
            for name in group:
                full = f"{where}.{name}"
                mod = block.get_submodule(name)
                W = weight_of(mod, sm.arch.conv1d)
                spec = layer_spec(q, full)
                if spec is None:
                    continue
                spec.check_divides(W.shape[1], full)
                qw, rep = _quantize_layer(full, W, hessians.pop(name, None), spec, q.method)
                set_weight(mod, qw.dequantize(torch.float32), sm.arch.conv1d)
                qweights[name] = qw
                reports.append(rep)
            if hidden is not None:
                trim_heap()  # GPTQ's freed temporaries, before the next forward pass
        if hidden is not None and q.propagate:
            run = whole if mlp_from is None else mlp_forward(sm, block, chain)
            for s in range(0, len(hidden), sm.batch_size):
                run(hidden, s, True)
        sink(i, block, qweights)
        del block
        trim_heap()
    return reports


def _mlp_start(groups: list[list[str]], chain: tuple[str, ...]) -> Optional[int]:
    """Index of the first group inside the MLP half, when the groups split cleanly into
    attention-side groups followed by MLP-half groups; otherwise None (whole-block passes)."""
    if not chain:
        return None
    roots = set(chain)
    inside = [all(n.split(".")[0] in roots for n in g) for g in groups]
    mixed = any(any(n.split(".")[0] in roots for n in g) and not ins for g, ins in zip(groups, inside))
    if mixed or not any(inside):
        return None
    first = inside.index(True)
    return first if all(inside[first:]) else None
