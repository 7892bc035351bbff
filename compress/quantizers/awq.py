"""AWQ: activation-aware weight quantization by per-channel scale folding.

Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", Sec. 3.2, as llm-compressor's ``AWQModifier`` runs it with ``duo_scaling``. Per
block and per scale mapping (``compress.models.arch.ScaleMapping``: a smooth layer feeding
balance linears), the scale ``s = x_mean^r / w_mean^(1-r)`` is searched over a grid of ``r``
in [0, 1): the balance weights are scaled by ``s``, fake-quantized on the method's grid and
divided by ``s`` again, and the ``r`` whose parent-module output is closest (MSE) to the
unquantized one wins. ``1/s`` is then folded into the smooth layer and ``s`` into the balance
layers' input columns, which leaves the block's function unchanged before quantization.
On a GGUF block grid (``QuantSpec.gguf_grid``, set per layer by ``export.format: gguf`` with a
k-quant type) the search's fake quantization and the final rounding are RTN's and GPTQ's on
that grid (`compress.quantizers.kgrid`), so the scales are chosen for the codes written.

The engine then quantizes the rescaled weights with ``quantize_weight``: round to nearest,
optionally with AutoAWQ's clipping search (a shrunk range per group minimising that group's
output error, ``dw^T H_gg dw``), or GPTQ's rounding (``rounding: gptq``); those two read the
layer's Hessian, which is the only statistic this method asks the engine for.

Which mappings apply to a block and the fold itself are shared with SmoothQuant
(``compress.quantizers.folding``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from compress.formats.qweight import QuantizedWeight
from compress.quantizers.base import (
    BlockView, CalibratedConfig, LayerStats, QuantResult, QuantSpec, StatKind, register_method,
)
from compress.quantizers.folding import fold_checked, live_mappings, weight_of
from compress.quantizers.gptq import GPTQSpec, gptq
from compress.quantizers.grid import dequantize, find_params, quantize
from compress.quantizers.rtn import round_to_nearest

log = logging.getLogger(__name__)

# AutoAWQ's auto_clip: max_shrink 0.5 over a grid of 20 -> range factors 1.00, 0.95, .., 0.55.
CLIP_SHRINKS = tuple(1.0 - 0.05 * i for i in range(10))
# Grid points whose balance weights are built at once (each is then run on every batch); a
# mapping whose weights exceed this takes one point at a time.
CANDIDATE_BYTES = 256 << 20
EPS = 1e-4  # llm-compressor's floor in the duo-scaling formula; keeps s finite and > 0


class AWQConfig(CalibratedConfig):
    """AWQ scale search and folding, then RTN (or GPTQ) rounding of the rescaled weights."""

    method: Literal["awq"] = "awq"
    grid: int = Field(20, ge=1, description="Points r = 0, 1/grid, .. of the scale search")
    duo_scaling: bool = Field(True, description="s = x^r / w^(1-r) (llm-compressor); false: s = x^r (AutoAWQ)")
    # Defaults measured on SmolLM2-135M W4 g64 asym, 64 x 512 calibration windows, 20 x 512
    # evaluation windows (benchmarks/gptq_peers.py): search on all 64 windows, no clip: KL 0.1877
    # in 2640 s; on 16: 0.1933 in 536 s; on 16 with clip: 0.1541 in 643 s (llm-compressor 0.14's
    # AWQ: 0.1879 in 2187 s). The grid reruns the parent module per point, so the windows it
    # reads set AWQ's time; Lin et al. (Sec. 5.3) find AWQ's search insensitive to calibration size.
    max_windows: Optional[int] = Field(
        16, ge=1, description="Calibration windows the scale search reads (null: all); the activation "
        "statistics and the Hessians for clip / rounding: gptq read every window",
    )
    clip: Optional[bool] = Field(
        None, description="Search a shrunk range per group minimising the layer's output error "
        "(AutoAWQ's apply_clip). Default: on, except on a GGUF block grid, which chooses its own ranges; "
        "with rounding: gptq it is GPTQ's MSE range search",
    )
    rounding: Literal["rtn", "gptq"] = Field("rtn", description="How the rescaled weights are rounded")
    damp_percent: float = Field(0.05, gt=0, lt=1, description="GPTQ damping (rounding: gptq only)")

    def spec(self, bits: int, group_size: int, sym: bool) -> "AWQSpec":
        return AWQSpec(bits=bits, group_size=group_size, sym=sym, rounding=self.rounding, clip=self.clip,
                       damp_percent=self.damp_percent)

    def name_parts(self) -> list[str]:
        return (["gptq"] if self.rounding == "gptq" else []) + (["noclip"] if self.clip is False else [])


@dataclass(frozen=True)
class AWQSpec(QuantSpec):
    rounding: str = "rtn"
    clip: Optional[bool] = None  # None: on, except on a GGUF block grid (it chooses its own ranges)
    damp_percent: float = 0.05

    @property
    def clips(self) -> bool:
        return self.clip if self.clip is not None else self.gguf_grid is None


def _stats(q: AWQConfig) -> StatKind:
    return "hessian" if q.clip is not False or q.rounding == "gptq" else "none"


# ---- pure numerical cores ------------------------------------------------------------------
def _groups(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """``W`` [out, in] as one row per (group, output row): ``[G * out, gs]``, group-major."""
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    return W.reshape(out_f, in_f // gs, gs).permute(1, 0, 2).reshape(-1, gs)


def _ungroup(flat: torch.Tensor, out_f: int) -> torch.Tensor:
    n_g, gs = flat.shape[0] // out_f, flat.shape[1]
    return flat.reshape(n_g, out_f, gs).permute(1, 0, 2).reshape(out_f, n_g * gs)


def fake_quantize(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN of ``W`` [out, in] on ``spec``'s grid, dequantized (float32); a GGUF block grid is
    rounded as `round_to_nearest` rounds it (the codes RTN would write)."""
    if spec.gguf_grid is not None:
        return round_to_nearest(W, spec).dequantize(torch.float32)
    flat = _groups(W.float(), spec.group_size)
    s, z = find_params(flat, spec.bits, spec.sym)
    return _ungroup(dequantize(quantize(flat, s, z, spec.bits), s, z), W.shape[0])


def weight_mean(weights: list[torch.Tensor], group_sizes: list[int]) -> torch.Tensor:
    """Mean over every output row of ``|W|`` normalised by its group's max (llm-compressor's
    ``w_mean``), per input channel ``[in]``, over all balance layers stacked."""
    rows = []
    for W, gs in zip(weights, group_sizes):
        flat = _groups(W.float().abs(), gs)
        rows.append(_ungroup(flat / (flat.amax(dim=1, keepdim=True) + 1e-6), W.shape[0]))
    return torch.cat(rows).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float, duo: bool) -> torch.Tensor:
    """AWQ's per-channel scale for one grid point, normalised so that max * min = 1."""
    x = x_mean.float()
    if duo:
        s = (x.pow(ratio) / (w_mean.float().pow(1 - ratio) + EPS)).clamp(min=EPS)
    else:
        s = x.pow(ratio).clamp(min=EPS)
    return s / (s.max() * s.min()).sqrt()


def best_ratio(losses: torch.Tensor) -> Optional[int]:
    """Index of the smallest finite loss (the first on ties), or None when none is finite."""
    finite = torch.isfinite(losses)
    if not bool(finite.any()):
        return None
    return int(torch.where(finite, losses, torch.full_like(losses, float("inf"))).argmin())


def clip_params(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec,
                shrinks: tuple[float, ...] = CLIP_SHRINKS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (group, row) scale and zero ``[G * out]`` minimising the group's output error
    ``dw H_gg dw^T`` over shrunk ranges (AutoAWQ's ``auto_clip``: the error of ``x_g . w_g``
    over the calibration tokens, which is what the diagonal block of the Hessian measures)."""
    out_f, in_f = W.shape
    flat = _groups(W.float(), spec.group_size)
    gs = flat.shape[1]
    n_g = in_f // gs
    Hb = torch.stack([H[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(n_g)]).float()
    best = torch.full((flat.shape[0],), float("inf"), device=flat.device)
    scale, zero = torch.empty_like(best), torch.empty_like(best)
    for p in shrinks:
        s, z = find_params(flat, spec.bits, spec.sym, shrink=p)
        d = (dequantize(quantize(flat, s, z, spec.bits), s, z) - flat).reshape(n_g, out_f, gs)
        err = torch.einsum("goi,gij,goj->go", d, Hb, d).reshape(-1)
        better = err < best
        best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _on_grid(W: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor) -> QuantizedWeight:
    out_f, in_f = W.shape
    flat = _groups(W.float(), spec.group_size)
    gs, n_g = flat.shape[1], in_f // flat.shape[1]
    return QuantizedWeight(
        codes=_ungroup(quantize(flat, scale, zero, spec.bits), out_f).to(torch.uint8),
        scales=scale.reshape(n_g, out_f).t().contiguous(),
        zeros=zero.reshape(n_g, out_f).t().contiguous().to(torch.uint8),
        g_idx=torch.arange(in_f, dtype=torch.int32) // gs,
        bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
    )


def quantize_weight(W: torch.Tensor, stats: LayerStats, spec: AWQSpec) -> QuantResult:
    """Rounds a weight the block transform already rescaled."""
    if spec.clip and spec.gguf_grid is not None:
        raise ValueError(f"awq clip searches a uniform grid's range; GGUF {spec.gguf_grid} chooses its own (remove clip)")
    if spec.rounding == "gptq" or spec.clips:
        if stats.hessian is None:
            raise ValueError("awq with clip or rounding: gptq needs the layer's Hessian; calibration gave none")
    if spec.rounding == "gptq":
        # GPTQ's defaults (act-order over static groups, so g_idx stays in order); its own
        # clipping search stands in for AWQ's here.
        res = gptq(W, stats.hessian, GPTQSpec(spec.bits, spec.group_size, spec.sym, damp_percent=spec.damp_percent,
                                               desc_act=True, static_groups=True, mse_clip=spec.clips
                                               ).on_gguf_grid(spec.gguf_grid))
        if res.damp_percent != spec.damp_percent:
            spec = AWQSpec(**{**spec.__dict__, "damp_percent": res.damp_percent})
        return QuantResult(res.weight, spec)
    if spec.gguf_grid is not None:
        return QuantResult(round_to_nearest(W, spec), spec)
    if spec.clips:
        scale, zero = clip_params(W, stats.hessian, spec)
    else:
        scale, zero = find_params(_groups(W.float(), spec.group_size), spec.bits, spec.sym)
    return QuantResult(_on_grid(W, spec, scale, zero), spec)


# ---- the block transform -------------------------------------------------------------------
class _Captured(Exception):
    """Stops the block's forward once the parent module's call arguments are recorded."""


def _set_weight(mod: nn.Module, W: torch.Tensor, conv1d: bool) -> None:
    mod.weight.data.copy_((W.t() if conv1d else W).to(mod.weight.dtype))


def _parent_call(view: BlockView, parent: nn.Module, x: torch.Tensor) -> tuple[tuple, dict]:
    got: dict = {}

    def hook(module, args, kwargs):
        got["call"] = (args, kwargs)
        raise _Captured

    handle = parent.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        view.forward(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "call" not in got:
        raise RuntimeError(f"block {view.index}: the forward never reached the AWQ parent module")
    return got["call"]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _candidates(mods: list[nn.Module], W0: list[torch.Tensor], specs: list[Optional[QuantSpec]],
                s: torch.Tensor) -> Optional[list[torch.Tensor]]:
    """The balance weights for scale ``s``: scaled, fake-quantized and unscaled, in each module's
    dtype; None when that overflows the dtype or gives NaN (not a candidate)."""
    out = []
    for m, W, sp in zip(mods, W0, specs):
        Ws = W * s
        cand = ((Ws if sp is None else fake_quantize(Ws, sp)) / s).to(m.weight.dtype)
        if not (torch.isfinite(Ws.to(m.weight.dtype)).all() and torch.isfinite(cand).all()):
            return None
        out.append(cand)
    return out


def _search(view: BlockView, smooth: str, balance: tuple[str, ...], parent_name: str,
            x_mean: torch.Tensor, specs: list[Optional[QuantSpec]], n: int, where: str) -> Optional[torch.Tensor]:
    """The best scale of one mapping, or None when no grid point gave a finite error.

    Each grid point's weights are built once and kept while every batch is run with them
    (they used to be rebuilt per batch: a quarter of AWQ's time on SmolLM2); the points are
    taken in chunks of at most `CANDIDATE_BYTES`, and a chunk after the first recomputes the
    unquantized reference outputs rather than keeping them."""
    q, conv1d, block = view.config, view.arch.conv1d, view.block
    mods = [block.get_submodule(b) for b in balance]
    saved = [m.weight.data.clone() for m in mods]
    W0 = [weight_of(m, conv1d).float().clone() for m in mods]
    gsizes = [(sp or q).group_size for sp in specs]
    w_mean = weight_mean(W0, gsizes)
    scales = [candidate_scales(x_mean, w_mean, k / q.grid, q.duo_scaling) for k in range(q.grid)]
    losses = torch.zeros(q.grid, dtype=torch.float64)
    parent = block.get_submodule(parent_name) if parent_name else None
    per_point = sum(m.weight.numel() * m.weight.element_size() for m in mods)
    chunk = max(1, CANDIDATE_BYTES // max(per_point, 1))
    try:
        with torch.no_grad():
            for first in range(0, q.grid, chunk):
                points = range(first, min(first + chunk, q.grid))
                cands = {k: _candidates(mods, W0, specs, scales[k]) for k in points}
                for k, c in cands.items():
                    if c is None:
                        losses[k] = float("inf")  # overflows the module's dtype: not a candidate
                live = [(k, c) for k, c in cands.items() if c is not None]
                if not live:
                    continue
                for start in range(0, n, view.batch_size):
                    x = view.inputs.read(start, min(start + view.batch_size, n))
                    for m, w in zip(mods, saved):
                        m.weight.data.copy_(w)
                    if parent is None:
                        def run():
                            return view.forward(x)
                    else:
                        args, kwargs = _parent_call(view, parent, x)

                        def run():
                            return _first(parent(*args, **kwargs))
                    ref = run().float()
                    if not bool(torch.isfinite(ref).all()):
                        raise ValueError(f"{where}{parent_name or 'block'}: NaN or Inf in its unquantized output")
                    for k, cand in live:
                        for m, c in zip(mods, cand):
                            _set_weight(m, c, conv1d)
                        losses[k] += float((run().float() - ref).pow(2).mean())
                del cands, live
    finally:
        for m, w in zip(mods, saved):
            m.weight.data.copy_(w)
    k = best_ratio(losses)
    if k is None:
        return None
    log.debug("awq %s%s -> %s: r = %.2f (error %.3g; r = 0: %.3g)", where, smooth, ",".join(balance),
              k / q.grid, float(losses[k]), float(losses[0]))
    return scales[k]


def apply_awq(view: BlockView) -> None:
    """Search and fold AWQ's scales for every mapping of the block (the method's block transform)."""
    arch, q, block = view.arch, view.config, view.block
    where = f"{arch.blocks}.{view.index}."
    live = live_mappings(view, where, "awq")
    if not live:
        return
    if view.forward is None:
        raise ValueError("awq needs the block's forward in its BlockView; this engine gave none")
    names = sorted({b for m, _ in live for b in m.balance})
    x_means = view.collect(names, "act_magnitude")  # one pass: each fold keeps the others' inputs
    n = len(view.inputs) if q.max_windows is None else min(q.max_windows, len(view.inputs))
    probe = view.inputs.read(0, min(view.batch_size, n))
    ref = view.forward(probe)
    dtype = next(block.parameters()).dtype
    for m, specs in live:
        x_mean = x_means[m.balance[0]]
        if not bool(torch.isfinite(x_mean).all()):
            raise ValueError(f"layer '{where}{m.balance[0]}': calibration inputs produced NaN or Inf")
        s = _search(view, m.smooth, m.balance, m.parent, x_mean, specs, n, where)
        if s is None:
            log.warning("awq %s%s -> %s: every scale candidate overflowed %s or gave NaN; left unscaled",
                        where, m.smooth, ",".join(m.balance), dtype)
            continue
        fold_checked(view, m, s, probe, ref, where)


register_method("awq", AWQConfig, stats=_stats, block_transform=apply_awq)(quantize_weight)
