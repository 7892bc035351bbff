"""Fisher-weighted output error: each option's predicted whole-model KL, per linear.

For a perturbation d of a linear's outputs, the KL from the model is to second order
``1/2 d^T F d`` with F the Fisher information of the model's own next-token distribution,
``E_y[g g^T]``, g the gradient of log p(y) at those outputs with y drawn from the model. With
one drawn label per position, ``E[(g_t . (W - Q) x_t)^2]`` over positions t estimates it per
layer (the per-position diagonal of F: cross-position terms are dropped). Unlike the relative
output error it sees what the blocks after the layer and the head do to an error: g carries
both, so the predicted loss is in units of KL and comparable across layers and blocks.

Two block walks over a few calibration windows, memory-bound like the rest: forward, keeping
each block's inputs (n_blocks streams of windows x seqlen x hidden floats: SmolLM2-135M, 2 x 512
windows, 30 x 2.4 MB = 71 MB; on disk under `calibration.spool_dir`); the labels and the
gradient at the last block's output, a vocabulary slice at a time
(`compress.evaluate.vocab_stream.sampled_log_prob_grad`); then backward, block n-1 to 0, each
block loaded again and run differentiably on its stored inputs with the gradient at its output,
which gives the gradient at every linear's output (and at the block's input, for the block
before). Compute: about three forward passes over those windows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from compress.activations import WindowStream
from compress.quantizers.base import QuantSpec
from compress.quantizers.rtn import round_to_nearest


def fisher_losses(sm, ids: torch.Tensor, options: dict[str, list[Optional[QuantSpec]]],
                  spool_dir: Optional[Path] = None, seed: int = 0) -> dict[str, list[float]]:
    """`options[name]` (full names) -> ``1/2 mean_t (g_t . (W - Q) x_t)^2`` of each option's
    round-to-nearest weights over every position t of the windows ``ids`` (the predicted KL,
    mean per position, as the evaluation's); 0 for None (left in float). `sm` is a
    `StreamedModel` with its outer modules loaded."""
    from compress.evaluate.vocab_stream import ROWS, sampled_log_prob_grad
    from compress.progress import progress
    from compress.stages.passes import weight_of

    n = sm.n_blocks
    inputs: list[WindowStream] = []
    acc: dict[str, torch.Tensor] = {}
    hidden = sm.embed(ids, spool_dir)
    grad = WindowStream(len(hidden), hidden.device, spool_dir)
    try:
        for i in progress(range(n), desc="fisher forward", unit="block"):  # keep each block's inputs
            s = WindowStream(len(hidden), hidden.device, spool_dir)
            for w in range(0, len(hidden), sm.batch_size):
                s.write(w, hidden.read(w, w + sm.batch_size))
            inputs.append(s)
            sm.run_block(sm.load_block(i), i, hidden)
        gen = torch.Generator().manual_seed(seed)
        softcap = getattr(sm.config, "final_logit_softcapping", None)
        for w in range(len(hidden)):
            g = sm.head_input_backward(hidden.read(w, w + 1), ids[w : w + 1], lambda x: sampled_log_prob_grad(
                x.reshape(-1, x.shape[-1]), lambda: sm.head_slices(ROWS), softcap, gen)[0].reshape(x.shape))
            grad.write(w, g)
        hidden.close()
        for i in progress(range(n - 1, -1, -1), desc="fisher backward", unit="block"):
            block = sm.load_block(i)
            block.requires_grad_(False)
            prefix = f"{sm.block_prefix}{i}."
            names = [name for name, _ in block.named_modules() if prefix + name in options]
            deltas = {}
            for name in names:
                W = weight_of(block.get_submodule(name), sm.arch.conv1d).float()
                deltas[name] = [None if spec is None else W - round_to_nearest(W, spec.grid).dequantize(torch.float32)
                                for spec in options[prefix + name]]
                acc[prefix + name] = torch.zeros(len(deltas[name]), dtype=torch.float64)
            for w in range(0, len(inputs[i]), sm.batch_size):
                _backward_batch(sm, block, i, inputs[i], grad, w, names, deltas, acc, prefix)
            inputs[i].close()
            del block
    finally:
        hidden.close()
        grad.close()
        for s in inputs:
            s.close()
    missing = sorted(set(options) - set(acc))
    if missing:
        raise RuntimeError(f"fisher: layers never reached in the block walk: {missing[:3]}")
    for name, a in acc.items():
        if not torch.isfinite(a).all():
            raise ValueError(f"layer '{name}': the Fisher-weighted error is NaN or Inf (calibration inputs or "
                             "gradients); set quantize.target_options.predictor: relative_output_error")
    return {name: [0.5 * float(v) / ids.numel() for v in a] for name, a in acc.items()}


def _backward_batch(sm, block, i: int, inputs: WindowStream, grad: WindowStream, w: int, names: list[str],
                    deltas: dict, acc: dict, prefix: str) -> None:
    """One batch of windows back through block `i`: each linear's share of the Fisher sum, and
    the gradient at the block's input written over the one at its output."""
    x = inputs.read(w, w + sm.batch_size).requires_grad_(True)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name in names:
        def hook(module, args, out, name=name):
            out.register_hook(lambda g, name=name: seen.__setitem__(name, (args[0].detach(), g.detach())))
        handles.append(block.get_submodule(name).register_forward_hook(hook))
    try:
        y = sm.block_output(block, i, x, grad=True)
        (gx,) = torch.autograd.grad(y, x, grad.read(w, w + sm.batch_size))
    finally:
        for h in handles:
            h.remove()
    for name in names:
        X, G = seen[name]
        X, G = X.reshape(-1, X.shape[-1]).float(), G.reshape(-1, G.shape[-1]).float()
        for k, D in enumerate(deltas[name]):
            if D is not None:  # per position: g . (W - Q) x, squared, summed
                acc[prefix + name][k] += float(((X @ D.t()) * G).sum(1).double().pow(2).sum())
    grad.write(w, gx.detach())
