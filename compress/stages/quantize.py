"""Stage: quantize every decoder block, one block at a time.

Input capture, statistics accumulation, the method's block transform and module swapping live
here; the methods in `compress.quantizers` only see tensors. Inside a block, linears are quantized in the
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
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from compress.activations import WindowStream
from compress.config import RunConfig
from compress.engine import StreamedModel
from compress.evaluate.memory import trim_heap
from compress.quantizers import get_method
from compress.quantizers.base import (
    NO_STATS, BlockView, LayerStats, Method, MethodConfig, NumericalError, QuantResult, QuantSpec,
)
from compress.quantizers.hessian import relative_output_error
from compress.stages.passes import (
    block_forward, collect_stats, mlp_chain, mlp_forward, split_matches, weight_of,
)

if TYPE_CHECKING:
    from compress.resume import CandidateStore, ResumePoint

log = logging.getLogger(__name__)


def report_dicts(reports: list["LayerReport"]) -> list[dict]:
    import dataclasses

    return [dataclasses.asdict(r) for r in reports]


@dataclass(frozen=True)
class Plan:
    """One candidate: a name and its fully resolved `quantize` settings (a method's config)."""

    name: str
    q: MethodConfig


def candidate_name(q: MethodConfig) -> str:
    gs = "ch" if q.group_size == -1 else f"g{q.group_size}"  # per output channel: "ch"
    # Asymmetric is the default grid: a name marks "sym" unless the method has no other grid.
    marked = q.sym is True and type(q).model_fields["sym"].default is not True
    parts = [q.method, f"w{q.bits}", gs] + (["sym"] if marked else []) + q.name_parts()
    if q.target is not None:  # bits and group size are the base the allocation starts from
        parts.append(q.target.label())
    if q.lm_head is not None:
        parts.append(q.lm_head.label(q, "head"))
    if q.embedding is not None:
        parts.append(q.embedding.label(q, "emb", rounded=False))
    return "-".join(parts)


def merge_method(base: MethodConfig, changes: dict, where: str) -> MethodConfig:
    """`base` with `changes` applied; a change of method keeps only the settings the new
    method has. A change the method does not have is an error naming `where.key`."""
    from pydantic import ValidationError

    method = get_method(changes.get("method", base.method))
    fields = method.config.model_fields
    alien = sorted(k for k in changes if k not in fields)
    if alien:
        raise ValueError(f"{where}.{alien[0]}: not a setting of method '{method.name}'")
    # An unset sym (None: the format's default) is left to the new method's own default.
    data = {k: v for k, v in base.model_dump().items()
            if k in fields and k != "method" and not (k == "sym" and v is None)}
    try:
        return method.config.model_validate({**data, **changes, "method": method.name})
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"{where}.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def resolve_plans(cfg: RunConfig) -> list[Plan]:
    """The candidates of a run: `candidates:` entries applied over `quantize:`, or just it,
    with an unset `sym` resolved by the export format (`Format.default_sym`)."""
    from compress.formats.registry import get_format

    def resolved(q: MethodConfig) -> MethodConfig:
        fmt = get_format(cfg.export.format)
        return q if q.sym is not None else q.model_copy(update={"sym": fmt.default_sym(cfg.export)})

    if not cfg.candidates:
        q = resolved(cfg.quantize)
        return [Plan(candidate_name(q), q)]
    plans = []
    for k, c in enumerate(cfg.candidates):
        changes = c.model_dump(exclude_none=True, exclude={"name"})
        q = resolved(merge_method(cfg.quantize, changes, f"candidates.{k}"))
        plans.append(Plan(c.name or candidate_name(q), q))
    names = [p.name for p in plans]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"candidates: two candidates resolve to the same name {dup}; give them names")
    return plans


def layer_spec(q: MethodConfig, name: str) -> Optional[QuantSpec]:
    """Settings for linear `name` after `skip` and `overrides`, or None to keep it unquantized."""
    if any(re.search(p, name) for p in q.skip):
        return None
    bits, gs, sym, gguf = q.bits, q.group_size, bool(q.sym), None  # unresolved sym (None): asymmetric
    for o in q.overrides:  # later overrides win
        if re.search(o.pattern, name):
            if o.skip:
                return None
            bits = o.bits if o.bits is not None else bits
            gs = o.group_size if o.group_size is not None else gs
            sym = o.sym if o.sym is not None else sym
            gguf = o.gguf_type if o.gguf_type is not None else gguf
    return q.spec(bits, gs, sym).on_gguf_grid(gguf)


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
    name: str, W: torch.Tensor, stats: LayerStats, spec: QuantSpec, method: Method
) -> tuple[QuantResult, LayerReport]:
    t0 = time.perf_counter()
    used = method.name
    if not torch.isfinite(W).all():
        raise ValueError(f"layer '{name}': weights contain NaN or Inf")
    for kind, t in vars(stats).items():
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"layer '{name}': calibration inputs produced NaN or Inf ({kind})")
    try:
        res = method.quantize(W, stats, spec)
    except NumericalError as e:
        log.warning(
            "layer '%s': %s; falling back to RTN for this layer (raise quantize.damp_percent "
            "or add calibration samples to avoid this)", name, e,
        )
        used = "rtn-fallback"
        res = get_method("rtn").quantize(W, NO_STATS, spec.grid)
    Wq = res.weight.dequantize(torch.float32)
    if not torch.isfinite(Wq).all():
        raise ValueError(f"layer '{name}': quantized weights contain NaN or Inf")
    Wf = W.float()
    w_err = float((Wf - Wq).pow(2).sum() / Wf.pow(2).sum().clamp_min(1e-30))
    o_err = None if stats.hessian is None else relative_output_error(Wf, Wq, stats.hessian)
    rep = LayerReport(name, res.spec.bits, res.spec.group_size, used, w_err, o_err, time.perf_counter() - t0)
    return res, rep


BlockSink = Callable[[int, nn.Module, dict[str, QuantResult]], None]


def quantize_model(
    sm: StreamedModel, plan: Plan, calib_ids: Optional[torch.Tensor], sink: BlockSink,
    spool_dir: Optional[Path] = None, store: Optional["CandidateStore"] = None,
    point: Optional["ResumePoint"] = None, head_sink: Optional[Callable[[torch.Tensor], None]] = None,
) -> list[LayerReport]:
    """Quantize block by block; `sink(i, block, results)` receives each finished block.

    `sm` is used up: its outer modules are released once the calibration windows are embedded.
    With `spool_dir`, the calibration activations between blocks live in a temporary file
    there instead of in memory (`WindowStream`). With `store` (compress/resume.py), the
    progress after each block (the layer reports, and the activations that feed the next
    block) is saved there; with `point`, the walk continues at `point.start` from that progress
    (the blocks before it are the caller's to replay). With `head_sink`, the Hessian of what
    the lm_head receives over the calibration windows leaving the last block
    (`compress.stages.head`) is handed to it after the walk: the final norm is kept for that,
    and the store keeps the last block's outputs, so a run stopped before the head resumes there.

    The block handed to the sink holds the fake-quantized (dequantized) weights in its linears.
    """
    method = get_method(plan.q.method)
    start = point.start if point is not None else 0
    hidden = None
    if method.needs_calibration:
        if calib_ids is None:
            raise ValueError(f"quantize.method: {method.name} needs calibration data")
        hidden = sm.embed(calib_ids, spool_dir)  # also records each block's call arguments
    elif head_sink is not None:
        raise ValueError(f"quantize.lm_head.rounding: gptq needs calibration data, which method {method.name} "
                         "does not read")
    try:
        walker = _BlockQuantizer(sm, plan, method, hidden, sink)
        if start:
            walker.restore(point)
            if hidden is not None and (start < sm.n_blocks or head_sink is not None):
                store.restore_stream(hidden)
        # the sink (exporter) took its copy of the outer modules when it was created
        sm.release_outer(keep_head_path=head_sink is not None)

        def process(i: int, block: nn.Module, stream: Optional[WindowStream]) -> None:
            walker(i, block, stream)
            if store is not None:
                # nothing reads the last block's outputs, unless the head's Hessian does
                last = i + 1 == sm.n_blocks and head_sink is None
                store.save_progress(i + 1, None if last else stream, report_dicts(walker.reports),
                                    walker.state())

        sm.walk(hidden, process, f"quantize {plan.name}", start=start)
        if head_sink is not None:
            from compress.stages.head import head_hessian

            head_sink(head_hessian(sm, hidden, calib_ids, walker.sdtype))
        return walker.reports
    finally:
        if hidden is not None:
            hidden.close()


class _BlockQuantizer:
    """The quantize stage's block processor: statistics, the method's block transform, then
    each sequential group of linears, with the quantized block's outputs fed onwards."""

    def __init__(self, sm: StreamedModel, plan: Plan, method: Method, hidden: Optional[WindowStream],
                 sink: BlockSink) -> None:
        self.sm, self.plan, self.method, self.sink = sm, plan, method, sink
        q = plan.q
        self.propagate = hidden is not None and getattr(q, "propagate", False)
        self.sdtype = torch.float64 if getattr(q, "hessian_dtype", "float32") == "float64" else torch.float32
        self.chain = mlp_chain(sm) if self.propagate else ()
        self.stats = method.stats_for(q)
        self.reports: list[LayerReport] = []

    def state(self) -> dict:
        """What later blocks depend on besides the stream: the MLP-half decision of block 0."""
        return {"chain": list(self.chain)}

    def restore(self, point: "ResumePoint") -> None:
        self.chain = tuple(point.walker.get("chain", self.chain))
        self.reports = [LayerReport(**r) for r in point.reports]

    def _collect(self, block, i, names, hidden, early_stop, forward, capture=None, kind=None):
        return collect_stats(self.sm, block, names, hidden, self.sdtype, early_stop, forward,
                             capture=capture, where=f"{self.sm.block_prefix}{i}", kind=kind or self.stats)

    def __call__(self, i: int, block: nn.Module, hidden: Optional[WindowStream]) -> None:
        sm, q, method = self.sm, self.plan.q, self.method
        groups = block_linears(block, sm.arch.sequential)
        chain = self.chain
        if chain and i == 0 and not split_matches(sm, block, i, chain, hidden.read(0, sm.batch_size)):
            log.warning("the %s blocks' MLP half did not reproduce the block's output; running the "
                        "whole block for every group instead (slower, same result)", sm.arch.family)
            chain = self.chain = ()
        whole = block_forward(sm, block, i)
        if method.block_transform is not None and hidden is not None:
            method.block_transform(BlockView(
                i, block, sm.arch, q, hidden,
                lambda names, kind: self._collect(block, i, names, hidden, True, whole, kind=kind),
                forward=lambda x: sm.block_output(block, i, x), batch_size=sm.batch_size,
            ))
        mlp_from = _mlp_start(groups, chain)
        results: dict[str, QuantResult] = {}
        stats: dict[str, torch.Tensor] = {}
        collect = hidden is not None and self.stats != "none"
        if collect and not self.propagate:
            # One pass with the original weights gives every statistic and the next inputs.
            stats = self._collect(block, i, [n for g in groups for n in g], hidden, False, whole)
        elif hidden is not None and not self.propagate:
            # Nothing below runs the block: its original outputs feed the next block's transform
            # (and the head's Hessian), as the statistics pass above would have written them.
            for s in range(0, len(hidden), sm.batch_size):
                whole(hidden, s, True)
        for g, group in enumerate(groups):
            if collect and self.propagate:
                if mlp_from is None or g < mlp_from:
                    stats = self._collect(block, i, group, hidden, True, whole)
                elif g == mlp_from:  # the attention half is final: h replaces the block inputs
                    stats = self._collect(block, i, group, hidden, True, whole, capture=chain[0])
                else:
                    stats = self._collect(block, i, group, hidden, True, mlp_forward(sm, block, chain))
            elif hidden is not None and self.propagate and g == mlp_from:
                _capture_h(sm, block, i, hidden, chain[0])
            if hidden is not None:
                # The forward's freed temporaries would otherwise stay resident under the method's.
                trim_heap()
            for name in group:
                full = f"{sm.block_prefix}{i}.{name}"
                mod = block.get_submodule(name)
                W = weight_of(mod, sm.arch.conv1d)
                spec = layer_spec(q, full)
                if spec is None:
                    continue
                spec.check_divides(W.shape[1], full)
                layer_stats = LayerStats(**{self.stats: stats.pop(name)}) if name in stats else NO_STATS
                res, rep = _quantize_layer(full, W, layer_stats, spec, method)
                set_weight(mod, res.weight.dequantize(torch.float32), sm.arch.conv1d)
                results[name] = res
                self.reports.append(rep)
            if hidden is not None:
                trim_heap()  # the method's freed temporaries, before the next forward pass
        if self.propagate:
            run = whole if mlp_from is None else mlp_forward(sm, block, chain)
            for s in range(0, len(hidden), sm.batch_size):
                run(hidden, s, True)
        self.sink(i, block, results)


def _capture_h(sm: StreamedModel, block: nn.Module, i: int, hidden: WindowStream, at: str) -> None:
    """Write the residual stream h (the input of `at`) over the block's inputs, for a method
    that propagates without collecting statistics of the MLP groups."""
    collect_stats(sm, block, [], hidden, torch.float32, True, block_forward(sm, block, i), capture=at,
                  where=f"{sm.block_prefix}{i}")


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
