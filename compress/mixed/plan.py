"""What the allocation chooses between, in bytes: the quantizable linears ("slots") with their
options, the bytes of every option exactly as the export format stores it, the bytes of the
rest of the artifact, and the budget a `quantize.target` leaves for the slots.

Counted as `export.format` writes them (`Format.linear_bytes`): codes, scales, zero points
and g_idx of a quantized linear (and its bias, in the dtype that format gives it); a linear
left in float is its weight (and bias) in `export.dtype`. The rest (embeddings, norms, an
lm_head, skipped linears) is fixed: `export.dtype` for floating tensors, as the exporter casts
them, and a `quantize.lm_head` head as the format stores it quantized. `bits_per_weight` counts only the slots, without biases, as `linear_bits_per_weight`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from compress.mixed.target import Target
from compress.quantizers.base import MethodConfig, Override, QuantSpec


@dataclass(frozen=True)
class Slot:
    """One quantizable linear: its options (None: left in float) and their bytes."""

    name: str  # full module name
    shape: tuple[int, int]  # [out, in]
    options: tuple[Optional[QuantSpec], ...]
    bytes: tuple[int, ...]

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class OuterSlot:
    """The input embedding and the lm_head, chosen together: a tied table is stored once only
    while the embedding stays in float, or, where the format shares it (`shared`), as the
    quantized head the embedding reads. Each option is (embedding spec, head spec), None for
    export.dtype; its bytes are every tensor outside the blocks (`outer_bytes`)."""

    embedding: str  # module names
    head: Optional[str]
    options: tuple[tuple[Optional[QuantSpec], Optional[QuantSpec]], ...]
    bytes: tuple[int, ...]
    shared: bool = False  # (None, head) stores the tied table once, on the head's grid
    # per option, the (embedding, head) grids the format rounds them on by itself where the
    # allocation leaves them float (`Format.rounded_outer`; None: the format keeps it float)
    format_grids: tuple[tuple[Optional[QuantSpec], Optional[QuantSpec]], ...] = ()

    def embedding_grid(self, i: int) -> Optional[QuantSpec]:
        """The grid the embedding's rows are read on under option `i`: its own, the shared
        head's, or the one the format rounds a float table to by itself."""
        emb, head = self.options[i]
        if emb is not None:
            return emb
        if self.shared:
            return head
        return self.format_grids[i][0] if self.format_grids else None

    def head_grid(self, i: int) -> Optional[QuantSpec]:
        """The grid the head's rows are read on under option `i`: its own, or the one the format
        rounds a float head (or the tied table it reads) to by itself."""
        head = self.options[i][1]
        if head is not None or not self.format_grids:
            return head
        return self.format_grids[i][1]

    def format_rounded(self, i: int) -> tuple[bool, bool]:
        """Whether option `i`'s embedding / head grid is the format's own rounding (to nearest)."""
        emb, head = self.options[i]
        grids = self.format_grids[i] if self.format_grids else (None, None)
        return (emb is None and not self.shared and grids[0] is not None, head is None and grids[1] is not None)


@dataclass(frozen=True)
class Budget:
    slots_bytes: int  # what the slots may take together
    fixed_bytes: int  # the rest of what the target counts (0 for bits_per_weight)
    counts: str  # "artifact tensors" or "quantizable linears"
    note: str  # how the budget was reached, for the log and the manifest


def option_grid(q: MethodConfig, fmt=None, export=None) -> list[Optional[QuantSpec]]:
    """Every option of `q.target_options` under the plan's method and symmetry (bits left out:
    the format's `target_bits`)."""
    o = q.target_options
    sizes = o.group_sizes if o.group_sizes is not None else list(dict.fromkeys([q.group_size, -1]))
    bits = o.bits if o.bits is not None else (fmt.target_bits(export) if fmt is not None else [2, 3, 4, 8])
    grid: list[Optional[QuantSpec]] = [q.spec(b, g, q.sym) for b in bits for g in sizes]
    return grid + ([None] if o.unquantized else [])


def slots(sm, q: MethodConfig, fmt, dtype: torch.dtype, with_bias: bool, export=None) -> list[Slot]:
    """The plan's quantizable linears (skips and skip overrides excluded), read off the
    skeleton, each with the options that divide it and that the format can hold, on the grid
    the format gives each (`Format.target_spec`; GGUF k-quants: a type per option)."""
    from compress.stages.passes import weight_of
    from compress.stages.quantize import block_linears, layer_spec

    grid = option_grid(q, fmt, export)
    out: list[Slot] = []
    for i in range(sm.n_blocks):
        t = sm.templates[i]
        for name in (n for g in block_linears(t, sm.arch.sequential) for n in g):
            full = f"{sm.block_prefix}{i}.{name}"
            if layer_spec(q, full) is None:
                continue
            mod = t.get_submodule(name)
            shape = tuple(weight_of(mod, sm.arch.conv1d).shape)
            bias = with_bias and getattr(mod, "bias", None) is not None
            opts, nbytes = [], []
            for spec in grid:
                if spec is None:
                    opts.append(None)
                    nbytes.append(fmt.float_bytes(shape, dtype) + (fmt.float_bytes((shape[0],), dtype) if bias else 0))
                    continue
                spec = fmt.target_spec(spec, shape, export)
                if spec is None or any(o is not None and o.grid == spec.grid for o in opts):
                    continue
                if spec.group_size != -1 and shape[1] % spec.group_size:
                    continue
                if fmt.check(full, spec, shape, sm.arch.conv1d) is not None:
                    continue
                opts.append(spec)
                nbytes.append(fmt.linear_bytes(shape, spec, bias, dtype))
            if not opts:
                raise ValueError(f"quantize.target_options: no option fits layer '{full}' {list(shape)} "
                                 f"in export.format {fmt.name}")
            out.append(Slot(full, shape, tuple(opts), tuple(nbytes)))
    return out


def outer_slot(sm, q: MethodConfig, fmt, dtype: torch.dtype, export) -> Optional[OuterSlot]:
    """The embedding and head as one more slot of a byte budget (`target_options.outer_bits`),
    or None when they are not options (bits_per_weight, a predictor not in KL units, no
    option `fmt` can store). An explicit `quantize.embedding` / `quantize.lm_head` is kept."""
    from itertools import product

    bits = q.target_options.outer(q.target)
    if not bits:
        return None
    o = q.target_options
    sizes = o.group_sizes if o.group_sizes is not None else list(dict.fromkeys([q.group_size, -1]))
    model = sm.model
    emb_mod, head_mod = model.get_input_embeddings(), model.get_output_embeddings()
    names = {m: n for n, m in model.named_modules() if m is emb_mod or m is head_mod}
    hidden = emb_mod.weight.shape[1]
    fits = lambda g: g == -1 or hidden % g == 0  # noqa: E731
    if q.embedding is not None:
        embs = [q.embedding.spec(q)]
    else:
        embs = [None] + [QuantSpec(b, g, sym) for b in bits for g in sizes for sym in dict.fromkeys([bool(q.sym), True])
                         if fits(g) and fmt.check_embedding(QuantSpec(b, g, sym), export) is None]
    if head_mod is None:
        heads = [None]
    elif q.lm_head is not None:
        heads = [q.lm_head.spec(q)]
    else:
        shape = tuple(head_mod.weight.shape)
        heads = [None] + [QuantSpec(b, g, bool(q.sym)) for b in bits for g in sizes
                          if fits(g) and fmt.check_head(QuantSpec(b, g, bool(q.sym)), export) is None
                          and fmt.check(names[head_mod], QuantSpec(b, g, bool(q.sym)), shape, False) is None]
    options = tuple(product(embs, heads))
    if len(options) < 2:
        return None
    from compress.stages.export import shares_table

    return OuterSlot(names[emb_mod], names.get(head_mod), options,
                     tuple(outer_bytes(sm, dtype, fmt, e, h, export) for e, h in options),
                     shared=shares_table(sm, fmt, None, QuantSpec(8, -1, True), export),
                     format_grids=tuple(_format_grids(sm, fmt, export, names, h is not None) for _, h in options))


def _format_grids(sm, fmt, export, names: dict, head_quantized: bool) -> tuple[Optional[QuantSpec], Optional[QuantSpec]]:
    """The (embedding, head) grids `fmt` rounds them on by itself (`Format.rounded_outer`); a
    head tied to the table (kept float) reads the table, so it takes the table's grid."""
    model = sm.model
    emb_mod, head_mod = model.get_input_embeddings(), model.get_output_embeddings()
    grids = {n: g for n, (_, g) in fmt.rounded_outer(sm, export, head_quantized).items()}
    table = grids.get(f"{names[emb_mod]}.weight")
    if head_mod is None:
        return table, None
    tied = not head_quantized and head_mod.weight is emb_mod.weight
    return table, table if tied else grids.get(f"{names[head_mod]}.weight")


def fixed_bytes(sm, slot_names: set[str], dtype: torch.dtype, q: Optional[MethodConfig] = None, fmt=None,
                outer: bool = True, export=None) -> int:
    """Bytes of every artifact tensor that is not a slot's, as the exporter writes them: the
    embedding and head as `q.embedding` / `q.lm_head` have `fmt` store them (`outer_bytes`),
    unless not `outer` (they are an `OuterSlot`), and what `fmt` adds (`Format.graph_bytes`)."""
    emb = head = None
    if q is not None:
        emb = None if q.embedding is None else q.embedding.spec(q)
        head = None if q.lm_head is None else q.lm_head.spec(q)
    total = outer_bytes(sm, dtype, fmt, emb, head, export) if outer else 0
    total += fmt.graph_bytes(sm.model.config) if fmt is not None else 0
    for i in range(sm.n_blocks):
        prefix = f"{sm.block_prefix}{i}."
        for name, t in sm.templates[i].state_dict().items():
            if prefix + name.rsplit(".", 1)[0] not in slot_names:
                total += _size(t, dtype, fmt)
    return total


def _size(t: torch.Tensor, dtype: torch.dtype, fmt=None) -> int:
    """Bytes of tensor `t` as written: a float one as `fmt` stores floats (`Format.float_bytes`,
    `dtype` without a format), any other in its own dtype."""
    if not t.is_floating_point():
        return t.numel() * t.element_size()
    return fmt.float_bytes(tuple(t.shape), dtype) if fmt is not None else t.numel() * dtype.itemsize


def outer_bytes(sm, dtype: torch.dtype, fmt, embedding: Optional[QuantSpec], head: Optional[QuantSpec],
                export=None) -> int:
    """Bytes of the tensors outside the blocks with the input embedding and the lm_head stored on
    `embedding` / `head` by `fmt` (None: in `dtype`), as the exporter writes them: a tied table
    once, unless the embedding is quantized (the head is then its own tensor), and as the
    quantized head only where `fmt` shares it (`shares_table`)."""
    from compress.stages.export import outer_state, shares_table

    model = sm.model
    emb_mod, head_mod = model.get_input_embeddings(), model.get_output_embeddings()
    names = {m: n for n, m in model.named_modules() if m is emb_mod or m is head_mod}
    skip = set()
    total = 0
    if fmt is not None and shares_table(sm, fmt, embedding, head, export):
        skip.add(f"{names[emb_mod]}.weight")  # the table is the head's codes
    if embedding is not None:
        skip.add(f"{names[emb_mod]}.weight")
        total += fmt.embedding_bytes(tuple(emb_mod.weight.shape), embedding, dtype)
    if head is not None:
        skip.add(f"{names[head_mod]}.weight")
        total += fmt.linear_bytes(tuple(head_mod.weight.shape), head, head_mod.bias is not None, dtype)
    rounded = fmt.rounded_outer(sm, export, head is not None) if fmt is not None else {}  # (bytes, grid)
    return total + sum(rounded[n][0] if n in rounded else _size(t, dtype, fmt)
                       for n, t in outer_state(sm, untie=embedding is not None) if n not in skip)


def budget(target: Target, cfg, config, all_slots: list[Slot], fixed: int) -> Budget:
    """The bytes the slots may take under `target` (`cfg` the run config, for `serving` and
    `serving.gpus`; `config` the model's transformers config, for the KV cache)."""
    if target.bits_per_weight is not None:
        n = sum(s.weights for s in all_slots)
        return Budget(int(target.bits_per_weight * n // 8), 0, "quantizable linears",
                      f"{target.bits_per_weight:g} bits x {n:,} weights")
    if target.max_bytes is not None:
        return Budget(target.max_bytes - fixed, fixed, "artifact tensors", f"max_bytes {target.max_bytes:,}")
    from compress.serving import GIB, attention_shape, kv_cache_bytes

    gpu = find_gpu(target.gpu, cfg.serving.gpus)
    s = cfg.serving
    ctx_len = target.context_length or s.context_length
    batch = target.batch or s.batch
    kv = kv_cache_bytes(attention_shape(config), ctx_len, batch, s.kv_dtype)
    overhead = int(round(s.overhead_gb * GIB))
    total = int(gpu.memory_gb * GIB) - kv - overhead
    note = (f"{gpu.name}: {gpu.memory_gb:g} GiB - KV cache {kv / GIB:.2f} GiB ({ctx_len} tokens x {batch}, "
            f"{s.kv_dtype}) - overhead {s.overhead_gb:g} GiB = {total:,} bytes of weights")
    return Budget(total - fixed, fixed, "artifact tensors", note)


def find_gpu(name: str, gpus_path: Optional[str]):
    """The GPU of the table whose name is `name`, or the only one that contains it."""
    from compress.serving import load_gpus

    gpus = load_gpus(gpus_path)
    exact = [g for g in gpus if g.name.lower() == name.lower()]
    part = exact or [g for g in gpus if name.lower() in g.name.lower()]
    if len(part) != 1:
        listed = "; ".join(g.name for g in gpus)
        why = "matches several GPUs" if part else "is not in the GPU table"
        raise ValueError(f"quantize.target.gpu: {name!r} {why} (serving.gpus): {listed}")
    return part[0]


def overrides_for(q: MethodConfig, chosen: dict[str, Optional[QuantSpec]]) -> list[Override]:
    """Exact-name overrides (`^name$`) that make `layer_spec` give each layer its chosen
    option; layers whose spec already matches get none."""
    from compress.stages.quantize import layer_spec

    out = []
    for name, spec in chosen.items():
        now = layer_spec(q, name)
        if spec is None:
            out.append(Override(pattern=f"^{re.escape(name)}$", skip=True))
        elif now is None or now.grid != spec.grid:
            out.append(Override(pattern=f"^{re.escape(name)}$", gguf_type=spec.gguf_grid) if spec.gguf_grid
                       else Override(pattern=f"^{re.escape(name)}$", bits=spec.bits,
                                     group_size=spec.group_size, sym=spec.sym))
    return out
