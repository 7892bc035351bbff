"""Keep a model's embedding and head in the dtype they are stored in, computing in another.

An artifact stores its unquantized embedding and lm_head in fp16; evaluation computes in
float32. Converting them on load doubles the largest tensors of a small model (SmolLM2's tied
49152 x 576 embedding is 21% of its weights). Here the embedding looks rows up in fp16 and
casts them, and the head multiplies by fp16 rows cast a slice at a time: the same values as a
float32 copy, at half its memory. Only plain `nn.Embedding` / `nn.Linear` modules are kept this
way; subclasses (Gemma's scaled embedding) may compute in their weight's dtype and are left alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ROWS = 8192  # head rows cast to the compute dtype at a time: 8192 x hidden floats


class UpcastLinear(nn.Linear):
    """`nn.Linear` whose weight stays in its stored dtype; inputs and outputs in `compute`."""

    def __init__(self, src: nn.Linear, compute: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = src.in_features, src.out_features
        self.weight = src.weight
        self.bias = src.bias
        self.compute = compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute)
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for s in range(0, self.out_features, _ROWS):
            b = None if self.bias is None else self.bias[s : s + _ROWS].to(self.compute)
            out[..., s : s + _ROWS] = F.linear(x, self.weight[s : s + _ROWS].to(self.compute), b)
        return out


def stored_outer_names(model: nn.Module) -> set[str]:
    """State names of the plain embedding and head weights that may stay in stored dtype."""
    keep = set()
    by_module = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is nn.Embedding:
        keep.add(f"{by_module[id(emb)]}.weight")
    if type(head) is nn.Linear:
        keep.add(f"{by_module[id(head)]}.weight")
    return keep


def install_upcast(model: nn.Module, compute: torch.dtype) -> None:
    """After loading: the embedding casts its output, the head computes in `compute`."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is nn.Embedding and emb.weight.dtype != compute:
        emb.register_forward_hook(lambda m, args, out: out.to(compute))
    if type(head) is nn.Linear and head.weight.dtype != compute:
        model.set_output_embeddings(UpcastLinear(head, compute))
