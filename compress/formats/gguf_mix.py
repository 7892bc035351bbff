"""Which GGUF type each tensor gets under `export.gguf_type`, as llama.cpp's `llama-quantize` decides.

Source: ggml-org/llama.cpp src/llama-quant.cpp (read at commit 007dbbf3; the same rules in the
llama.cpp that scripts/build-llamacpp.sh builds), functions ``llama_tensor_get_type_impl`` (the
mixes) and ``tensor_type_fallback`` (rows whose length is not a multiple of the type's block).
Only the rules of the ftypes we write are transcribed, for dense (non-MoE, non-Falcon) models:

- output.weight, or token_embd.weight when the embeddings are tied: Q8_0 when its row length is
  not a multiple of the base type's block, else Q6_K, except under Q8_0, which stays Q8_0.
  So a tied SmolLM2 (rows of 576) gets Q8_0 under Q4_0 too: Q6_K falls back to Q8_0.
- attn_v: Q4_K_M/Q5_K_M -> Q6_K where ``use_more_bits(i, n)``; Q4_K_S -> Q5_K for i < 4;
  Q3_K_M -> Q5_K for i < 2, else Q4_K.
- ffn_down: Q4_K_M/Q5_K_M -> Q6_K where ``use_more_bits``; Q4_K_S -> Q5_K for i < n/8;
  Q3_K_M -> Q5_K for i < n/16, else Q4_K.
- attn_output: Q3_K_M -> Q4_K.
- everything else (and token_embd when untied): the ftype's base type. For the simple ftypes
  (Q8_0, Q4_0, Q4_1) only the embedding / output rows matter here: the block linears take the
  type of their quantizer's grid (`gguf_blocks.type_for`). llama-quantize's Q4_0 with an
  importance matrix also stores the first n/8 ffn_down in Q4_1; that rule is not followed.
- fallback by row length: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when
  even that block does not divide the row.

A plain type name (Q4_K, Q5_K, Q6_K, Q3_K, Q2_K) is ``llama-quantize --pure``: that type for
every quantized tensor, output and token_embd included, fallbacks applied. ``i``/``n`` count the
attn_v (ffn_down) tensors in file order, which is the layer index for a dense model.
"""
from __future__ import annotations

from typing import Optional

from compress.quantizers.kgrid import get_grid

# ftype -> base type; the mixes llama-quantize names (plain type names are --pure)
MIXES = {"Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q5_K_M": "Q5_K", "Q3_K_M": "Q3_K"}
PURE = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SIMPLE = ("Q8_0", "Q4_0", "Q4_1")
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
K_TYPES = PURE + tuple(MIXES)
# `quantize.target_options.bits` -> the type a byte budget under a k-quant gguf_type may give a linear
TARGET_TYPES = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"}


def base_type(ftype: str) -> str:
    return MIXES.get(ftype, ftype)


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def category(gguf_name: str) -> str:
    """llama-quant.cpp's ``tensor_get_category``, for the names we write."""
    if gguf_name == "output.weight":
        return "output"
    if gguf_name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in gguf_name:
            return cat
    return "other"


def _mixed(ftype: str, cat: str, i: int, n: int, ncols: int, tied: bool) -> str:
    t = base_type(ftype)
    if ftype in PURE:  # --pure skips llama_tensor_get_type_impl, output included
        return t
    if cat == "output" or (tied and cat == "token_embd"):
        return "Q8_0" if ncols % get_grid(t).block or t == "Q8_0" else "Q6_K"
    if cat == "attn_v":
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            return "Q6_K"
        if ftype == "Q4_K_S" and i < 4:
            return "Q5_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
    elif cat == "ffn_down":
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            return "Q6_K"
        if ftype == "Q4_K_S" and i < n // 8:
            return "Q5_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
    elif cat == "attn_output" and ftype == "Q3_K_M":
        return "Q4_K"
    return t


def fallback(t: str, ncols: int) -> str:
    if ncols % get_grid(t).block == 0:
        return t
    f = FALLBACK.get(t)
    if f is None:
        if get_grid(t).block > 32:
            raise ValueError(f"no fallback for GGUF type {t} with rows of {ncols}")
        f = t  # a 32-block type has no smaller block to fall back to: F16 below, as llama.cpp does
    return f if ncols % get_grid(f).block == 0 else "F16"


def assign(ftype: str, tensors: list[tuple[str, int]], tied: bool) -> dict[str, str]:
    """GGUF type of each quantizable 2-D weight, given as ``(gguf name, row length)`` in file
    order; ``tied``: the model has no output.weight (token_embd serves as the output)."""
    if ftype not in K_TYPES + SIMPLE:
        raise ValueError(f"export.gguf_type: '{ftype}' is not a GGUF type compress writes "
                         f"({', '.join(SIMPLE + K_TYPES)})")
    n = {c: sum(category(g) == c for g, _ in tensors) for c in ("attn_v", "ffn_down")}
    seen = {"attn_v": 0, "ffn_down": 0}
    out: dict[str, str] = {}
    for g, ncols in tensors:
        cat = category(g)
        i = seen.get(cat, 0)
        t = _mixed(ftype, cat, i, n.get(cat, 0), ncols, tied)
        if cat in seen:
            seen[cat] += 1
        out[g] = fallback(t, ncols)
    return out


def quantizable(gguf_name: str, ndim: int) -> bool:
    """llama-quant.cpp's ``tensor_allows_quantization`` for the tensors we write."""
    return ndim >= 2 and gguf_name.endswith("weight") and "_norm.weight" not in gguf_name



def tensor_types(sm, config, ftype: str, head_quantized: bool = False) -> dict[str, str]:
    """HF weight name -> GGUF type (or "F16": kept in float) of every quantizable weight of the
    streamed model `sm`, linears of the blocks and the embedding / untied lm_head, under `ftype`.
    ``head_quantized``: `quantize.lm_head` writes the head as its own tensor (rounded by our
    quantizer, so it is left out here) and the file is untied: token_embd follows the untied
    rule, as llama-quantize would treat that file."""
    from compress.formats.gguf_meta import Names
    from compress.stages.passes import weight_of
    from compress.stages.quantize import block_linears

    names = Names(config)
    model = sm.model
    emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings()
    tied = out_emb is None or out_emb.weight is emb.weight or bool(getattr(config, "tie_word_embeddings", False))
    tied = tied and not head_quantized
    mods = dict(model.named_modules())
    emb_name = next(n for n, m in mods.items() if m is emb) + ".weight"
    rows: list[tuple[str, str, int]] = [(emb_name, names.gguf(emb_name), int(emb.weight.shape[1]))]
    for i in range(sm.n_blocks):
        for name in (n for g in block_linears(sm.templates[i], sm.arch.sequential) for n in g):
            full = f"{sm.block_prefix}{i}.{name}.weight"
            w = weight_of(sm.templates[i].get_submodule(name), sm.arch.conv1d)
            rows.append((full, names.gguf(full), int(w.shape[1])))
    if not tied and not head_quantized:
        out_name = next(n for n, m in mods.items() if m is out_emb) + ".weight"
        rows.append((out_name, names.gguf(out_name), int(out_emb.weight.shape[1])))
    types = assign(ftype, [(g, c) for _, g, c in rows], tied)
    return {hf: types[g] for hf, g, _ in rows}
