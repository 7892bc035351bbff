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
from typing import Callable, Optional

import torch
from torch import nn

from compress.config import QuantizeConfig, RunConfig
from compress.engine import StopForward, StreamedModel
from compress.formats.qweight import QuantizedWeight
from compress.progress import progress
from compress.quantizers import QuantSpec, get_quantizer
from compress.quantizers.hessian import HessianAccumulator, output_error

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


def weight_of(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores it transposed)."""
    return module.weight.detach().t() if conv1d else module.weight.detach()


def set_weight(module: nn.Module, W: torch.Tensor, conv1d: bool) -> None:
    W = W.t() if conv1d else W
    module.weight.data.copy_(W.to(module.weight.dtype))


def _collect_hessians(
    sm: StreamedModel, block: nn.Module, i: int, names: list[str], hidden: list[torch.Tensor],
    dtype: torch.dtype, early_stop: bool,
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Hessians of `names` over every window; with `early_stop` each batch's forward ends as
    soon as the last of them has its input (later sub-layers are not computed), and no block
    outputs are returned."""
    accs: dict[str, HessianAccumulator] = {}
    handles = []
    pending: set[str] = set()
    # Layers fed the very same tensor (q/k/v, gate/up) share one Hessian: it is accumulated
    # once, by the first of them in each forward (GPTQModel de-duplicates the same way).
    last: dict = {"x": None, "name": None}
    aliased: dict[str, list[str]] = {n: [] for n in names}  # per batch: whose input it shared

    def make_hook(n: str, acc: HessianAccumulator):
        def hook(module, args):
            x = args[0]
            if x is last["x"]:
                aliased[n].append(last["name"])
            else:
                acc.add(x.detach())
                last["x"], last["name"] = x, n
            pending.discard(n)
            if early_stop and not pending:
                raise StopForward
        return hook

    for n in names:
        mod = block.get_submodule(n)
        in_f = weight_of(mod, sm.arch.conv1d).shape[1]
        accs[n] = HessianAccumulator(in_f, dtype=dtype, device=sm.device)
        handles.append(mod.register_forward_pre_hook(make_hook(n, accs[n])))
    out: list[torch.Tensor] = []
    batches = 0
    try:
        for s in range(0, len(hidden), sm.batch_size):
            pending.update(names)
            last["x"] = last["name"] = None
            out.extend(sm.run_block(block, i, hidden[s : s + sm.batch_size]))
            batches += 1
    finally:
        for h in handles:
            h.remove()
        last["x"] = None
    hessians = {n: accs[n].hessian for n in names if not aliased[n]}
    for n in names:
        if aliased[n]:
            leader = aliased[n][0]
            if aliased[n] != [leader] * batches or leader not in hessians:
                raise RuntimeError(f"block {i}: {n} shared its input with {leader} in only some batches")
            hessians[n] = hessians[leader]
    return hessians, out


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
    sm: StreamedModel, plan: Plan, calib_ids: Optional[torch.Tensor], sink: BlockSink
) -> list[LayerReport]:
    """Quantize block by block; `sink(i, block, qweights)` receives each finished block.

    `sm` is used up: its outer modules are released once the calibration windows are embedded.

    The block handed to the sink holds the fake-quantized (dequantized) weights in its linears.
    """
    q = plan.q
    method = get_quantizer(q.method)
    hdtype = torch.float64 if q.hessian_dtype == "float64" else torch.float32
    hidden = None
    if method.needs_hessian:
        if calib_ids is None:
            raise ValueError(f"quantize.method: {q.method} needs calibration data")
        hidden = sm.embed(calib_ids)
    sm.release_outer()  # the sink (exporter) took its copy of them when it was created
    reports: list[LayerReport] = []
    for i in progress(range(sm.n_blocks), desc=f"quantize {plan.name}", unit="block"):
        block = sm.load_block(i)
        groups = block_linears(block, sm.arch.sequential)
        qweights: dict[str, QuantizedWeight] = {}
        hessians: dict[str, torch.Tensor] = {}
        if hidden is not None and not q.propagate:
            # One pass with the original weights gives every Hessian and the next inputs.
            names = [n for g in groups for n in g]
            hessians, hidden = _collect_hessians(sm, block, i, names, hidden, hdtype, early_stop=False)
        for group in groups:
            if hidden is not None and q.propagate:
                hessians, _ = _collect_hessians(sm, block, i, group, hidden, hdtype, early_stop=True)
            for name in group:
                full = f"{sm.block_prefix}{i}.{name}"
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
        if hidden is not None and q.propagate:
            hidden = sm.run_block(block, i, hidden, consume=True)
        sink(i, block, qweights)
        del block
    return reports
