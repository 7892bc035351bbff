"""Calibration passes over one decoder block: statistics collection and the block's two halves.

GPTQ's sequential order needs the inputs of each group of linears after the earlier groups
are quantized. Running the whole block for every group repeats the attention for each MLP
group; where the architecture's MLP half is known as data (`ArchSpec.mlp_half`:
output = h + chain(h)), the pass that collects the first MLP group's Hessian also writes the
residual stream h after attention over the block's inputs, and the MLP groups and the final
outputs then only run the chain. `split_matches` checks that decomposition against the
block's own forward once per run, so a transformers release that changes a block's layout
falls back to whole-block passes instead of computing something else.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import nn

from compress.activations import WindowStream
from compress.engine import StopForward, StreamedModel
from compress.quantizers.base import StatKind
from compress.quantizers.channel_stats import accumulator

log = logging.getLogger(__name__)

# (the stream, the batch's first window, write the outputs over its inputs?) -> None
Forward = Callable[[WindowStream, int, bool], None]


def weight_of(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores it transposed)."""
    return module.weight.detach().t() if conv1d else module.weight.detach()


def block_forward(sm: StreamedModel, block: nn.Module, i: int) -> Forward:
    def run(stream: WindowStream, start: int, in_place: bool) -> None:
        sm.run_batch(block, i, stream, start, write=in_place)
    return run


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def mlp_chain(sm: StreamedModel) -> tuple[str, ...]:
    """The architecture's MLP-half chain, or () where it does not apply to this config."""
    a = sm.arch
    if not a.mlp_half or (a.mlp_half_if and not getattr(sm.config, a.mlp_half_if, False)):
        return ()
    return a.mlp_half


def mlp_forward(sm: StreamedModel, block: nn.Module, chain: tuple[str, ...]) -> Forward:
    """Runs only the block's MLP half on windows that hold h: output = h + chain(h)."""
    mods = [block.get_submodule(n) for n in chain]

    def run(stream: WindowStream, start: int, in_place: bool) -> None:
        h = stream.read(start, start + sm.batch_size)
        y = h
        with torch.no_grad():
            try:
                for m in mods:
                    y = _first(m(y))
            except StopForward:
                return
            if in_place:
                stream.write(start, h + y.reshape(h.shape))
    return run


def split_matches(sm: StreamedModel, block: nn.Module, i: int, chain: tuple[str, ...], x: torch.Tensor) -> bool:
    """Whether h + chain(h) reproduces the block's own output on one batch (h read off the
    chain's first module's input during that forward)."""
    got: dict[str, torch.Tensor] = {}

    def grab(module, args):
        got["h"] = args[0].detach().clone()

    handle = block.get_submodule(chain[0]).register_forward_pre_hook(grab)
    try:
        full = sm.block_output(block, i, x)
    finally:
        handle.remove()
    if "h" not in got:
        return False
    h = got["h"].reshape(full.shape)
    y = h
    with torch.no_grad():
        for n in chain:
            y = _first(block.get_submodule(n)(y))
    split = h + y.reshape(h.shape)
    return bool(torch.allclose(split, full, rtol=1e-4, atol=1e-5 * float(full.abs().max().clamp_min(1))))


def collect_stats(
    sm: StreamedModel, block: nn.Module, names: list[str], hidden: WindowStream,
    dtype: torch.dtype, early_stop: bool, forward: Forward, capture: Optional[str] = None,
    where: str = "", kind: StatKind = "hessian",
) -> dict[str, torch.Tensor]:
    """Statistic `kind` (Hessian, or per-channel input magnitude) of the inputs of each of
    `names` over every window, running `forward` batch by batch.

    With `early_stop` each batch's forward ends as soon as the last of them has its input
    (later sub-layers are not computed); without it the outputs overwrite `hidden` in place.
    With `capture`, the input of that submodule (the residual stream h) overwrites each
    batch's windows in `hidden` as the forward reaches it.
    """
    accs: dict = {}
    handles = []
    pending: set[str] = set()
    batch: dict = {"start": 0}
    # Layers fed the very same tensor (q/k/v, gate/up) share one Hessian: it is accumulated
    # once, by the first of them in each forward (GPTQModel de-duplicates the same way).
    last: dict = {"x": None, "name": None}
    aliased: dict[str, list[str]] = {n: [] for n in names}  # per batch: whose input it shared

    def done(key: str) -> None:
        pending.discard(key)
        if early_stop and not pending:
            raise StopForward

    def make_hook(n: str, acc):
        def hook(module, args):
            x = args[0]
            if x is last["x"]:
                aliased[n].append(last["name"])
            else:
                acc.add(x.detach())
                last["x"], last["name"] = x, n
            done(n)
        return hook

    def capture_hook(module, args):
        x = args[0].detach()
        hidden.write(batch["start"], x.reshape(-1, *hidden.window_shape))
        done("\0capture")

    for n in names:
        mod = block.get_submodule(n)
        in_f = weight_of(mod, sm.arch.conv1d).shape[1]
        accs[n] = accumulator(kind, in_f, dtype, sm.device)
        handles.append(mod.register_forward_pre_hook(make_hook(n, accs[n])))
    if capture is not None:  # registered last: runs after a Hessian hook on the same module
        handles.append(block.get_submodule(capture).register_forward_pre_hook(capture_hook))
    batches = 0
    try:
        for s in range(0, len(hidden), sm.batch_size):
            pending.update(names)
            if capture is not None:
                pending.add("\0capture")
            last["x"] = last["name"] = None
            batch["start"] = s
            forward(hidden, s, not early_stop)
            if pending:
                raise RuntimeError(f"{where}: the forward never reached {sorted(p for p in pending if p[0] != chr(0))}")
            batches += 1
    finally:
        for h in handles:
            h.remove()
        last["x"] = None
    stats = {n: accs[n].result for n in names if not aliased[n]}
    for n in names:
        if aliased[n]:
            leader = aliased[n][0]
            if aliased[n] != [leader] * batches or leader not in stats:
                raise RuntimeError(f"{where}: {n} shared its input with {leader} in only some batches")
            stats[n] = stats[leader]
    return stats
