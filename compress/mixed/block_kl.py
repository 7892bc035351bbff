"""Measured per-block sensitivity: the whole-model KL when only one decoder block is quantized.

The relative output error of a linear says how much its own output moves, not how much the
model's output distribution moves: an error in block i is amplified or damped by the blocks
after it, and the logits are more sensitive to some blocks than to others. Here that is
measured directly, for every block at once, in one block walk over a few calibration windows:

* stream 0 holds the original model's hidden states;
* when block j is loaded, every perturbed stream i < j (block i quantized, the rest original)
  runs through the original block j, and a new stream j is opened: a copy of stream 0's
  inputs run through block j with its linears replaced by their reference option's
  round-to-nearest weights;
* at the end each perturbed stream's final hidden states go through the model's own final
  norm and head, and KL(original || perturbed) is read off a vocabulary slice at a time
  (`compress.evaluate.vocab_stream.kl_divergences`), against stream 0's.

Each block is loaded once; compute is n(n+1)/2 block forwards over the windows plus one head
pass per block (the original's logits computed once). Memory: n_blocks + 1 streams of
windows x seqlen x hidden floats (SmolLM2-135M, 2 x 512 windows: 31 x 2.4 MB = 73 MB; an 8B
Llama: 33 x 17 MB = 550 MB), on disk instead under `calibration.spool_dir`; one block; the
outer modules (embedding, final norm), which stay loaded for the head pass; and at the end every
block's head inputs (as much again as the streams).

A seam for options outside the blocks (a quantized embedding or head, not built here): the
embedding's KL is one more perturbed stream, opened before block 0 from quantized embedding
rows; the head's is `kl_divergences` with the candidate's head slices quantized.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from compress.activations import WindowStream
from compress.quantizers.base import QuantSpec
from compress.quantizers.rtn import round_to_nearest


@contextlib.contextmanager
def quantized(block: nn.Module, specs: dict[str, QuantSpec], conv1d: bool):
    """The block's linears `specs` (names inside the block) hold their round-to-nearest
    weights inside the `with`; the original weights are back afterwards."""
    from compress.stages.passes import weight_of
    from compress.stages.quantize import set_weight

    saved = {}
    try:
        for n, spec in specs.items():
            mod = block.get_submodule(n)
            W = weight_of(mod, conv1d)
            saved[n] = W.clone()
            set_weight(mod, round_to_nearest(W.float(), spec.grid).dequantize(torch.float32), conv1d)
        yield block
    finally:
        for n, W in saved.items():
            set_weight(block.get_submodule(n), W, conv1d)


class BlockKL:
    """KL(original || only block i quantized at its reference options), for every block i,
    accumulated over one block walk: call `step` with each block in order, then `finish`."""

    def __init__(self, sm, ids: torch.Tensor, spool_dir: Optional[Path] = None) -> None:
        self.sm, self.ids, self.spool_dir = sm, ids, spool_dir
        self.original = sm.embed(ids, spool_dir)
        self.perturbed: list[Optional[WindowStream]] = []  # index: the block quantized in it

    def step(self, i: int, block: nn.Module, specs: dict[str, QuantSpec]) -> None:
        """Block `i` (original weights) over every stream; `specs` its reference options (names
        inside the block). A block with no quantizable linear gets no stream (its KL is 0)."""
        for s in self.perturbed:
            if s is not None:
                self.sm.run_block(block, i, s)
        mine = None
        if specs:
            mine = WindowStream(len(self.original), self.original.device, self.spool_dir)
            for s in range(0, len(self.original), self.sm.batch_size):
                mine.write(s, self.original.read(s, s + self.sm.batch_size))
            with quantized(block, specs, self.sm.arch.conv1d):
                self.sm.run_block(block, i, mine)
        self.sm.run_block(block, i, self.original)
        self.perturbed.append(mine)

    def finish(self) -> list[float]:
        """KL per block (mean over every position of the windows); frees the streams."""
        from compress.evaluate.vocab_stream import ROWS, kl_divergences

        sm, ids = self.sm, self.ids
        try:
            ref = sm.head_inputs(self.original, ids)
            xs: dict[int, torch.Tensor] = {}
            for i, s in enumerate(self.perturbed):
                if s is not None:
                    xs[i] = sm.head_inputs(s, ids)
                    s.close()
            kl = dict(zip(xs, kl_divergences(ref, list(xs.values()), lambda: sm.head_slices(ROWS),
                                             getattr(sm.config, "final_logit_softcapping", None))))
            # KL >= 0; a negative is float rounding
            return [max(kl.get(i, 0.0), 0.0) for i in range(len(self.perturbed))]
        finally:
            self.close()

    def close(self) -> None:
        self.original.close()
        for s in self.perturbed:
            if s is not None:
                s.close()
