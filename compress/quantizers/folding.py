"""Scale folding shared by the activation-aware methods (AWQ, SmoothQuant).

A ``ScaleMapping`` (``compress.models.arch``) names a smooth layer whose outputs are exactly the
inputs of its balance linears: dividing the smooth layer's outputs by ``s`` and multiplying
the balance layers' input columns by ``s`` leaves the block's function unchanged. Which
mappings apply to a block, the fold itself (Gemma's ``1 + w`` norms and GPT-2's transposed
``Conv1D`` weights included) and a check of the block's output after folding live here.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from compress.quantizers.base import BlockView

log = logging.getLogger(__name__)


def _is_linear(mod: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, (nn.Linear, Conv1D))


def weight_of(mod: nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores it transposed)."""
    return mod.weight.detach().t() if conv1d else mod.weight.detach()


def _channels_out(mod: nn.Module, conv1d: bool) -> Optional[int]:
    """How many channels the smooth layer emits (None: it has no weight to fold into)."""
    if getattr(mod, "weight", None) is None:
        return None
    return weight_of(mod, conv1d).shape[0] if _is_linear(mod) else mod.weight.numel()


def fold_scales(block: nn.Module, smooth: str, balance: tuple[str, ...], s: torch.Tensor, conv1d: bool,
                norm_plus_one: bool, where: str = "") -> None:
    """``smooth``'s outputs / s, every balance layer's input columns * s (in place). Computed in
    float32; a result that does not fit the module's dtype is an error naming the layer."""
    s = s.float()
    sm = block.get_submodule(smooth)
    new: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, parameter, value)
    if _is_linear(sm):
        new.append((smooth, sm.weight, (weight_of(sm, conv1d).float() / s[:, None])))
    elif norm_plus_one:  # y = norm(x) * (1 + w): (1 + w') = (1 + w) / s
        new.append((smooth, sm.weight, (1 + sm.weight.detach().float()) / s - 1))
    else:
        new.append((smooth, sm.weight, sm.weight.detach().float() / s))
    if getattr(sm, "bias", None) is not None:
        new.append((smooth, sm.bias, sm.bias.detach().float() / s))
    for b in balance:
        mod = block.get_submodule(b)
        new.append((b, mod.weight, weight_of(mod, conv1d).float() * s))
    for name, p, v in new:
        if v.ndim == 2 and conv1d:
            v = v.t()
        cast = v.to(p.dtype)
        if not bool(torch.isfinite(cast).all()):
            raise ValueError(f"layer '{where}{name}': the folded scales make its weights overflow {p.dtype} "
                             "(load in float32 or bfloat16 via model.dtype, or skip the layer)")
    for name, p, v in new:
        p.data.copy_((v.t() if v.ndim == 2 and conv1d else v).to(p.dtype))


def live_mappings(view: BlockView, where: str, method: str):
    """The family's mappings that apply to this block: (mapping, balance specs). SmoothQuant
    folds its scales through the same mappings."""
    from compress.stages.quantize import layer_spec  # overrides/skip resolve per full layer name

    arch, block = view.arch, view.block
    if not arch.awq:
        raise ValueError(f"quantize.method: {method} has no scale mappings for the '{arch.family}' family "
                         "(ArchSpec.awq in compress/models/arch.py); use rtn or gptq for it")
    live = []
    for m in arch.awq:
        width = _channels_out(block.get_submodule(m.smooth), arch.conv1d)
        ins = [weight_of(block.get_submodule(b), arch.conv1d).shape[1] for b in m.balance]
        if width is None or any(i != width for i in ins):
            log.debug("%s %s%s -> %s: skipped (%s outputs, inputs %s)", method, where, m.smooth, m.balance, width, ins)
            continue
        specs = [layer_spec(view.config, where + b) for b in m.balance]
        if all(sp is None for sp in specs):
            continue  # nothing it would protect is quantized
        for b, sp in zip(m.balance, specs):
            if sp is not None:
                sp.check_divides(ins[0], where + b)
        live.append((m, specs))
    return live


def _rel_change(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def fold_checked(view: BlockView, m, s: torch.Tensor, probe: torch.Tensor, ref: torch.Tensor,
                 where: str, method: str = "awq") -> bool:
    """Fold ``s`` through mapping ``m``, then check the block's output on ``probe`` against
    ``ref`` (its output before any fold); a fold that changes it is reverted with a warning.
    Returns whether the fold was kept."""
    arch, block = view.arch, view.block
    dtype = next(block.parameters()).dtype
    tol = max(1e-3, 8 * torch.finfo(dtype).eps)
    touched = [block.get_submodule(p) for p in (m.smooth, *m.balance)]
    saved = [{k: v.data.clone() for k, v in t.named_parameters(recurse=False)} for t in touched]
    fold_scales(block, m.smooth, m.balance, s, arch.conv1d, arch.norm_plus_one, where)
    change = _rel_change(view.forward(probe), ref)
    if change > tol:  # the mapping's data do not describe this block (e.g. OPT's post-norm)
        for t, params in zip(touched, saved):
            for k, v in params.items():
                getattr(t, k).data.copy_(v)
        log.warning("%s %s%s -> %s: folding changed the block's output (relative %.2g); this "
                    "mapping is skipped (check ArchSpec.awq in compress/models/arch.py)",
                    method, where, m.smooth, ",".join(m.balance), change)
        return False
    return True
