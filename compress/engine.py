"""The one sequential engine: a model whose decoder blocks exist one at a time.

Loading is `compress.models.weights.ModelWeights`: the skeleton on the meta device, the
modules outside the block list (embeddings, final norm, rotary tables, lm_head) materialized,
blocks read from the checkpoint on demand. Running is this module. To reach a block's inputs
without architecture-specific code we run the model's *own* forward with every block replaced
by a proxy: the proxies record each block's call arguments (attention masks, rotary
position embeddings, per-layer-type masks for Gemma 3, ...) and hand the embeddings through.
The same trick computes logits: the last proxy swaps in the final hidden states, and the
model's forward applies its final norm, lm_head and any logit soft-capping.

Calibration, quantization and evaluation all walk blocks through this class, so peak memory is
one block plus the activations of the windows in flight.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from compress.activations import WindowStream
from compress.models.weights import BlockPatcher, ModelWeights  # noqa: F401  (BlockPatcher re-exported)

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a proxy to end a forward early once it has what it needs."""


class StopForward(Exception):
    """Raised by a hook inside a block once it has captured what it needs from a batch;
    `run_block` then moves on to the next batch without finishing the block's forward."""


class _Proxy(nn.Module):
    def __init__(self, index: int, hook: Callable[[int, torch.Tensor, tuple, dict], torch.Tensor]):
        super().__init__()
        self.index = index
        self._hook = hook

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        return self._hook(self.index, hidden, args, kwargs)


@dataclass
class LayerCall:
    """Everything but the hidden states that the model's forward passes to block ``i``."""

    args: tuple
    kwargs: dict


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# (block index, the loaded block, the stream of activations or None) -> None
BlockProcessor = Callable[[int, nn.Module, Optional[WindowStream]], None]


class StreamedModel(ModelWeights):
    """`ModelWeights` that also runs: windows are embedded by the model's own forward, blocks
    run batch by batch over a `WindowStream`, and logits or head inputs come out of the
    model's own forward with proxies standing in for the blocks."""

    def __init__(self, *args: Any, batch_size: int = 2, **kwargs: Any) -> None:
        """`ModelWeights`' arguments, and how many windows run through a block at once."""
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size
        self._layer_calls: Optional[list[LayerCall]] = None

    # ---- forward through proxies -----------------------------------------------------------
    def _with_proxies(self, hook) -> None:
        for i in range(self.n_blocks):
            self.layers[i] = _Proxy(i, hook)

    def _restore(self) -> None:
        for i, t in enumerate(self.templates):
            self.layers[i] = t

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, spool_dir: Optional[Path] = None,
              rows: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> WindowStream:
        """Inputs of block 0 for each window ``input_ids[w]``, as a stream (in memory, or in a
        temporary file under `spool_dir`); records every block's call. `rows` maps embedding
        rows to the rows looked up instead (a quantized table's, for its sensitivity)."""
        calls: list[Optional[LayerCall]] = [None] * self.n_blocks
        stream = WindowStream(input_ids.shape[0], self.device, spool_dir)
        at = {"w": 0}

        def hook(i, hidden, args, kwargs):
            if i == 0:
                stream.write(at["w"], hidden)
            if self._layer_calls is None:
                calls[i] = LayerCall(args, kwargs)
                if i < self.n_blocks - 1:
                    return hidden
            raise _Stop

        self._with_proxies(hook)
        try:
            with self._compact_embedding(input_ids, rows=rows) as ids:
                for w in range(ids.shape[0]):
                    at["w"] = w
                    try:
                        self.model(input_ids=ids[w : w + 1].to(self.device), use_cache=False)
                    except _Stop:
                        pass
                    if self._layer_calls is None:
                        self._layer_calls = calls  # type: ignore[assignment]
        except BaseException:
            stream.close()
            raise
        finally:
            self._restore()
        return stream

    def block_output(self, block: nn.Module, i: int, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Block ``i``'s output for one batch ``[b, L, D]`` of windows (a `StopForward` raised
        by a hook inside it propagates); with `grad`, differentiable (for a backward pass)."""
        assert self._layer_calls is not None, "embed() must run before the blocks"
        call = self._layer_calls[i]
        with torch.set_grad_enabled(grad):
            # Windows share one length and no padding, so the recorded batch-1 masks and
            # rotary tables broadcast over a batch of them.
            return _first(block(x, *call.args, **call.kwargs))

    def run_batch(self, block: nn.Module, i: int, stream: WindowStream, start: int, write: bool = True) -> None:
        """Block ``i`` over the batch of `stream` that starts at window `start`; with `write`
        its outputs overwrite its inputs. A batch whose forward a hook stopped (`StopForward`)
        keeps its inputs."""
        try:
            y = self.block_output(block, i, stream.read(start, start + self.batch_size))
        except StopForward:
            return
        if write:
            stream.write(start, y)

    def walk(self, stream: Optional[WindowStream], process: "BlockProcessor", desc: str, start: int = 0) -> None:
        """The one block walk: load block ``i``, hand it to ``process(i, block, stream)``, free
        it, next. Quantization, evaluation and the tests all walk the model through here, so
        memory holds one block (plus whatever ``process`` keeps) at a time. A resumed
        quantization starts at block `start`, `stream` holding that block's inputs."""
        from compress.evaluate.memory import trim_heap
        from compress.progress import progress

        for i in progress(range(start, self.n_blocks), desc=desc, unit="block"):
            block = self.load_block(i)
            process(i, block, stream)
            del block
            trim_heap()  # the block's freed temporaries, so they do not sit under the next block

    def run_block(self, block: nn.Module, i: int, stream: WindowStream) -> None:
        """Block ``i`` over every window of `stream`, batch by batch, outputs written over the
        inputs: the stream is one long-lived buffer (or file) for the whole walk, instead of a
        fresh allocation per block interleaved on the heap with the forward's temporaries
        (which fragments it)."""
        for s in range(0, len(stream), self.batch_size):
            self.run_batch(block, i, stream, s)

    @torch.no_grad()
    def logits(self, final_hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[1, L, V]`` from the last block's output for one window."""
        last = self.n_blocks - 1

        def hook(i, hidden, args, kwargs):
            return final_hidden if i == last else hidden

        self._with_proxies(hook)
        try:
            out = self.model(input_ids=input_ids.to(self.device), use_cache=False)
        finally:
            self._restore()
        return out.logits

    @torch.no_grad()
    def head_inputs(self, final_hidden: WindowStream, input_ids: torch.Tensor) -> torch.Tensor:
        """What the lm_head receives, ``[windows, L, H]``, from each window's last-block output
        (`head_input_windows`, gathered)."""
        out = None
        for w, x in self.head_input_windows(final_hidden, input_ids):
            if out is None:
                out = x.new_empty(input_ids.shape[0], *x.shape[1:])
            out[w] = x[0]
        return out

    @torch.no_grad()
    def head_input_windows(self, final_hidden: WindowStream, input_ids: torch.Tensor):
        """``(w, x)`` for each window: what the lm_head receives, ``x`` [1, L, H], from window
        ``w``'s last-block output: the model's own forward applies its final norm (and OPT's
        projection) and stops there. The forward's embedding output is discarded by the proxies,
        but it still runs: through the compact table, so the full embedding's pages are not
        faulted in."""
        current: dict[str, torch.Tensor] = {}
        with self._to_head_input(current) as run, self._compact_embedding(input_ids) as ids:
            for w in range(ids.shape[0]):
                current["h"] = final_hidden.read(w, w + 1)
                x = run(ids[w : w + 1])
                current.pop("h")
                yield w, x

    def head_input_backward(self, final_hidden: torch.Tensor, input_ids: torch.Tensor,
                            grad_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """For one window: the gradient at the last block's output ``final_hidden`` [1, L, D]
        of a loss whose gradient at the lm_head's input x is ``grad_of(x)``, back through the
        model's own final norm (as `head_inputs`, differentiably)."""
        h = final_hidden.detach().requires_grad_(True)
        with self._to_head_input({"h": h}) as run, self._compact_embedding(input_ids) as ids, torch.enable_grad():
            x = run(ids)
            (g,) = torch.autograd.grad(x, h, grad_of(x.detach()))
        return g

    @contextmanager
    def _to_head_input(self, final: dict[str, torch.Tensor]):
        """``run(ids)``: the model's own forward on ``ids`` with the last block's output replaced
        by ``final["h"]``, stopped at the lm_head's input, which it returns."""
        last = self.n_blocks - 1
        got: dict[str, torch.Tensor] = {}

        def hook(i, hidden, args, kwargs):
            return final["h"] if i == last else hidden

        def grab(module, args):
            got["x"] = args[0]
            raise _Stop

        def run(ids: torch.Tensor) -> torch.Tensor:
            try:
                self.model(input_ids=ids.to(self.device), use_cache=False)
            except _Stop:
                pass
            return got.pop("x")

        handle = self.model.get_output_embeddings().register_forward_pre_hook(grab)
        self._with_proxies(hook)
        try:
            yield run
        finally:
            handle.remove()
            self._restore()

    def materialize_all(self) -> nn.Module:
        """The whole model in memory (for generation speed only; never for calibration)."""
        for i in range(self.n_blocks):
            self.layers[i] = self.load_block(i)
        return self.model
