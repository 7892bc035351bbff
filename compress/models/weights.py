"""A model's weights as a checkpoint read on demand: the meta skeleton, the modules outside the
block list (embeddings, final norm, head), and one decoder block at a time.

`compress.engine.StreamedModel` adds running blocks on top of this; `ModelWeights` alone is
all that shape checks, exporters and the vocabulary-sliced heads need.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

from compress.models.arch import ArchSpec, arch_for
from compress.models.checkpoint import Checkpoint, CheckpointError, check_header, check_loaded
from compress.stored_outer import install_upcast, stored_outer_names

log = logging.getLogger(__name__)


def _init_nonpersistent(model: nn.Module, root: nn.Module) -> None:
    """Recompute buffers that checkpoints do not store (rotary tables, embedding scales).

    transformers' own ``_init_weights`` knows how to fill them for every architecture.
    """
    for m in root.modules():
        if getattr(m, "_non_persistent_buffers_set", None):
            model._init_weights(m)


def _strip_quant(config):
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


# (block, block index, the block's tensors by local name) -> names of the modules it replaced;
# index None: the model's outer modules (a quantized lm_head), names from the root
BlockPatcher = Callable[[nn.Module, Optional[int], dict[str, torch.Tensor]], list[str]]


class ModelWeights:
    """A causal LM's weights, its blocks loaded from a checkpoint on demand.

    ``patch_block(block, i, tensors)`` may replace modules of a freshly built block before its
    tensors are loaded (the artifact reader swaps in quantized linears there); it pops the
    tensors it consumed from ``tensors`` and returns the names of the modules it replaced.
    """

    def __init__(
        self,
        config,
        checkpoint: Checkpoint,
        device: torch.device,
        dtype: torch.dtype,
        patch_block: Optional[BlockPatcher] = None,
        load_outer: bool = True,
        stored_outer: bool = False,
        patch_head: Optional[BlockPatcher] = None,
        read_embedding: Optional[Callable[[str, dict[str, torch.Tensor]], Any]] = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.arch: ArchSpec = arch_for(config.model_type)
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype
        self.patch_block = patch_block
        # a quantized lm_head's module (default: as the blocks'); called with index None
        self.patch_head = patch_head or patch_block
        # a quantized embedding's codes (`quantize.embedding`) -> its QuantizedWeight, by the format
        self.read_embedding = read_embedding
        self.embedding_quantized = False  # set when the outer modules are materialized
        config = _strip_quant(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.eval()
        self.model = model
        self.config = model.config
        self.layers: nn.ModuleList = model.get_submodule(self.arch.blocks)
        self.templates = list(self.layers)
        self.n_blocks = len(self.templates)
        self.block_prefix = self.arch.blocks + "."
        self.stored_outer = stored_outer  # embedding/head kept in the checkpoint's dtype
        self.head_patched: tuple[str, ...] = ()  # the quantized head's module, once materialized
        self._check_headers()
        if load_outer:  # a skeleton without weights suffices for shape checks
            self._materialize_outer()

    @property
    def n_params(self) -> int:
        """Parameters of the whole model (tied weights counted once), read off the skeleton."""
        seen = {id(p): p.numel() for t in self.templates for p in t.parameters()}
        seen.update({id(p): p.numel() for n, p in self.model.named_parameters()})
        return sum(seen.values())

    # ---- names ---------------------------------------------------------------------------
    def ckpt_name(self, name: str) -> Optional[str]:
        """Checkpoint key for a model state name (older checkpoints drop the base prefix)."""
        if name in self.checkpoint.index:
            return name
        prefix = getattr(self.model, "base_model_prefix", "") + "."
        if name.startswith(prefix) and name[len(prefix):] in self.checkpoint.index:
            return name[len(prefix):]
        return None

    def _check_headers(self) -> None:
        """Every checkpoint tensor the skeleton has a place for must fit it (shape, float-ness),
        read off the safetensors headers: a config.json that does not describe the weights
        fails here, naming the tensor, before any block is read."""
        for name, like in self.model.state_dict().items():
            ck = self.ckpt_name(name)
            if ck is not None and not self._holds_codes(ck):
                check_header(self.checkpoint, ck, like)

    def _holds_codes(self, ck: str) -> bool:
        """Whether checkpoint tensor `ck` is a quantized layer's integer codes stored under the
        weight's own name (compressed-tensors int-quantized: `P.weight` int8 beside
        `P.weight_scale`); the block patcher reads those, not the float skeleton."""
        return (self.patch_block is not None and ck.endswith(".weight")
                and ck[: -len("weight")] + "weight_scale" in self.checkpoint.index)

    def _weight_ckpt_name(self, module: nn.Module) -> Optional[str]:
        """Checkpoint key of an outer module's weight, or None where the checkpoint lacks it."""
        name = next(n for n, m in self.model.named_modules() if m is module)
        return self.ckpt_name(f"{name}.weight")

    def _load_into(
        self, module: nn.Module, prefix: str, patch: Optional[Callable] = None, keep: frozenset = frozenset(),
        patched: tuple[str, ...] = (),
    ) -> None:
        """Load ``module``'s tensors from the checkpoint keys under ``prefix``; modules named in
        ``patched`` already hold theirs."""
        if prefix:
            ck_prefix = prefix
            if not self.checkpoint.names(prefix):
                base = getattr(self.model, "base_model_prefix", "") + "."
                ck_prefix = prefix[len(base):] if prefix.startswith(base) else prefix
            raw = self.checkpoint.load(self.checkpoint.names(ck_prefix), device=self.device)
            ck_of = {k[len(ck_prefix):]: k for k in raw}
        else:
            found = {k: self.ckpt_name(k) for k in module.state_dict()
                     if not any(k.startswith(r + ".") for r in patched)}
            raw = self.checkpoint.load([c for c in found.values() if c], device=self.device)
            ck_of = {k: c for k, c in found.items() if c}
        local = {k: raw[c] for k, c in ck_of.items()}
        replaced: list[str] = list(patched) + (patch(module, local) if patch is not None else [])
        state = {}
        missing = []
        for k, like in module.state_dict().items():
            if any(k.startswith(r + ".") for r in replaced):
                continue
            if k in local:
                t = local.pop(k)
                check_loaded(self.checkpoint, ck_of[k], t, like)
                state[k] = t.to(self.dtype) if t.is_floating_point() and k not in keep else t
            elif not self._is_tied(k):
                missing.append(k)
        if missing:
            raise CheckpointError(
                f"{self.checkpoint.root}: tensors missing for '{prefix or 'model'}': {missing[:5]}"
            )
        if local:
            log.debug("ignoring checkpoint tensors under %r: %s", prefix, sorted(local)[:5])
        module.load_state_dict(state, strict=False, assign=True)

    def _is_tied(self, name: str) -> bool:
        out = self.model.get_output_embeddings()
        if out is None or not getattr(self.config, "tie_word_embeddings", False):
            return False
        return any(out is m and name == f"{n}.weight" for n, m in self.model.named_modules())

    # ---- outer modules ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _outer_only(self):
        """The model with its block list set aside, so whole-model calls (`to_empty`, `to`)
        touch only the outer modules; the (meta) blocks are put back afterwards."""
        parent_path, _, attr = self.arch.blocks.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        setattr(parent, attr, nn.ModuleList())
        try:
            yield self.model
        finally:
            setattr(parent, attr, self.layers)

    def _materialize_outer(self) -> None:
        with self._outer_only() as model:
            model.to_empty(device=self.device)
            _init_nonpersistent(model, model)
            keep = frozenset(stored_outer_names(model)) if self.stored_outer else frozenset()
            self.head_patched = self._patch_head(model)
            emb = self._quantized_embedding(model)
            self._load_into(model, "", keep=keep, patched=self.head_patched + emb)
            if model.get_output_embeddings() is not None and self._is_tied_missing():
                model.get_output_embeddings().weight = model.get_input_embeddings().weight
            if self.stored_outer:
                install_upcast(model, self.dtype)

    def _head_name(self) -> Optional[str]:
        head = self.model.get_output_embeddings()
        return None if head is None else next(n for n, m in self.model.named_modules() if m is head)

    def _embedding_name(self) -> str:
        emb = self.model.get_input_embeddings()
        return next(n for n, m in self.model.named_modules() if m is emb)

    def _patch_head(self, model: nn.Module) -> tuple[str, ...]:
        """An artifact's quantized lm_head (`quantize.lm_head`: its tensors stored under the
        head's name, no float weight) becomes the format's quantized module; the names of the
        modules replaced."""
        name = self._head_name()
        if self.patch_head is None or name is None or self.ckpt_name(f"{name}.weight") is not None:
            return ()
        stored = self.checkpoint.names(f"{name}.")
        if not stored:
            return ()
        return tuple(self.patch_head(model, None, self.checkpoint.load(stored, device=self.device)))

    def _quantized_embedding(self, model: nn.Module) -> tuple[str, ...]:
        """An artifact's quantized input embedding (its codes under the weight's own name, beside
        a `weight_scale`) dequantized into the module, in the checkpoint's scale dtype, or the
        compute dtype; the module's name, which the caller then leaves alone."""
        emb = model.get_input_embeddings()
        ck = self._weight_ckpt_name(emb)
        if self.read_embedding is None or ck is None or ck[: -len("weight")] + "weight_scale" not in self.checkpoint.index:
            return ()
        name = self._embedding_name()
        base = ck[: -len("weight")]
        stored = {k[len(base):]: v for k, v in self.checkpoint.load(self.checkpoint.names(base), device=self.device).items()}
        qw = self.read_embedding(name, stored)
        if tuple(qw.codes.shape) != tuple(emb.weight.shape):
            raise CheckpointError(f"{self.checkpoint.root}: quantized embedding '{ck}' has shape {tuple(qw.codes.shape)}, "
                                  f"the model's is {tuple(emb.weight.shape)}")
        dtype = stored["weight_scale"].dtype if self.stored_outer else self.dtype
        emb.weight = nn.Parameter(qw.dequantize(dtype), requires_grad=False)
        self.embedding_quantized = True
        return (name,)

    def release_outer(self, keep_head_path: bool = False) -> None:
        """Free the outer modules' weights (embeddings, final norm, head). For the quantize
        stage, which needs them only to embed the calibration windows and for the exporter's
        copy, both done before the block walk: the embedding is the largest single tensor of a
        small model. `embed()` and `logits()` fail afterwards. With `keep_head_path`, only the
        input and output embeddings go: what lies between the last block and the head (the
        final norm, OPT's projection: small) stays, so `head_input_windows` still runs, its
        lookups going through `_compact_embedding`."""
        with self._outer_only() as model:
            if not keep_head_path:
                model.to("meta")
                return
            for m in (model.get_input_embeddings(), model.get_output_embeddings()):
                if m is not None:
                    m.to("meta")

    def _is_tied_missing(self) -> bool:
        return getattr(self.config, "tie_word_embeddings", False) and not any(
            self.ckpt_name(n + ".weight") is not None
            for n, m in self.model.named_modules()
            if m is self.model.get_output_embeddings()
        )

    # ---- blocks ----------------------------------------------------------------------------
    def load_block(self, i: int) -> nn.Module:
        block = copy.deepcopy(self.templates[i])
        block.to_empty(device=self.device)
        _init_nonpersistent(self.model, block)
        patch = None
        if self.patch_block is not None:
            patch = lambda m, t: self.patch_block(m, i, t)  # noqa: E731
        self._load_into(block, f"{self.block_prefix}{i}.", patch)
        return block.eval()

    @contextlib.contextmanager
    def _compact_embedding(self, input_ids: torch.Tensor, rows_per_slice: int = 4096,
                           rows: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        """The input embedding swapped for a table of only the rows `input_ids` use, read from
        the checkpoint slice by slice; yields the ids renumbered into that table. Looking rows
        up in the memory-mapped embedding itself would leave most of its pages resident (the
        kernel maps neighbouring pages on each fault), the largest tensor of a small model."""
        emb = self.model.get_input_embeddings()
        ck = self._weight_ckpt_name(emb)
        if ck is None or self.checkpoint.pickled or not isinstance(emb, nn.Embedding) or self.embedding_quantized:
            # e.g. a tied weight stored only under the head's name; a dequantized table
            if rows is None:
                yield input_ids
                return
            weight = emb.weight
            emb.weight = nn.Parameter(rows(weight.detach()), requires_grad=False)
            try:
                yield input_ids
            finally:
                emb.weight = weight
            return
        vocab = emb.weight.shape[0]
        uniq, inverse = torch.unique(input_ids, return_inverse=True)
        if uniq.numel() and (int(uniq[0]) < 0 or int(uniq[-1]) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}); got {int(uniq[0])}..{int(uniq[-1])}")
        parts = []
        for s in range(0, vocab, rows_per_slice):
            sel = uniq[(uniq >= s) & (uniq < s + rows_per_slice)]
            if sel.numel():
                parts.append(self.checkpoint.load_rows(ck, s, s + rows_per_slice)[sel - s].to(emb.weight.dtype))
        table = torch.cat(parts).to(self.device) if parts else emb.weight[:0].to(self.device)
        if rows is not None:
            table = rows(table)
        weight, padding_idx = emb.weight, emb.padding_idx
        # padding_idx only shapes gradients; unset, as it may exceed the compact table's size.
        emb.weight, emb.padding_idx = nn.Parameter(table, requires_grad=False), None
        try:
            yield inverse
        finally:
            emb.weight, emb.padding_idx = weight, padding_idx

    def head_slices(self, rows: int):
        """The lm_head as ``(start, weight rows, bias rows)`` slices in the compute dtype, read
        from the checkpoint a slice at a time (a tied head reads the embedding's rows), so its
        full table is never resident."""
        head = self.model.get_output_embeddings()
        if self.head_patched:  # a quantized head (`_patch_head`), held by its module
            yield from _patched_rows(head, rows, self.dtype)
            return
        ck = self._weight_ckpt_name(head)
        if ck is None and getattr(self.config, "tie_word_embeddings", False):
            ck = self._weight_ckpt_name(self.model.get_input_embeddings())
        if ck is None:
            raise CheckpointError(f"{self.checkpoint.root}: the lm_head's weight is missing from the checkpoint")
        vocab = head.weight.shape[0]
        bias = getattr(head, "bias", None)
        for s in range(0, vocab, rows):
            w = self.checkpoint.load_rows(ck, s, s + rows).to(self.device, self.dtype)
            yield s, w, None if bias is None else bias[s : s + rows].to(self.dtype)


def _patched_rows(head: nn.Module, rows: int, dtype: torch.dtype):
    """`head_slices` of a quantized head's module: a `QuantLinear`'s codes dequantized a slice
    of rows at a time, or the float weight a patcher decoded them to."""
    bias = head.bias
    qw = head.quantized_weight() if hasattr(head, "quantized_weight") else None
    for s in range(0, head.out_features, rows):
        w = head.weight[s : s + rows].to(dtype) if qw is None else qw.rows(s, s + rows).dequantize(dtype)
        yield s, w, None if bias is None else bias[s : s + rows].to(dtype)
