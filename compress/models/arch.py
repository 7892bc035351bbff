"""Per-architecture differences as data.

Everything the engine needs to know about a family: where the decoder blocks live, the order
in which a block's linear layers are quantized (GPTQ's "true sequential" groups: attention
inputs, attention output, MLP inputs, MLP output), and whether linears are GPT-2 style
``Conv1D`` (weight stored ``[in, out]``), and the scale-folding mappings of activation-aware
methods (AWQ). Embeddings, final norm, rotary embeddings and the
tied ``lm_head`` are reached through the model's own forward, so they need no entries here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleMapping:
    """One place where input channels can be rescaled without changing the block's function:
    ``smooth``'s outputs (a norm's weight, or a linear's output rows) are exactly the inputs of
    every ``balance`` linear, so ``smooth / s`` and ``balance`` columns ``* s`` cancel (AWQ,
    Lin et al. 2023, Sec. 3.2; llm-compressor's ``AWQMapping``). ``parent``: the submodule
    whose output the scale search compares (the balance layers' nearest common ancestor);
    "" compares the whole block's output."""

    smooth: str
    balance: tuple[str, ...]
    parent: str = ""


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    conv1d: bool = False
    # The block's second half as a chain of submodules: output = h + chain(h), where h (the
    # residual stream after attention) is the input of the chain's first module. Lets GPTQ
    # re-run only the MLP half while quantizing it. Empty: always run the whole block.
    mlp_half: tuple[str, ...] = ()
    # A config flag that must be true for `mlp_half` to hold (OPT's post-norm variant differs).
    mlp_half_if: str = ""
    # AWQ's scale mappings, in block order. A linear -> linear mapping applies only where the
    # shapes agree (v_proj -> o_proj needs as many key/value heads as query heads).
    awq: tuple[ScaleMapping, ...] = ()
    # The norms scale by (1 + weight) (Gemma's RMSNorm): folding 1/s into one rescales 1 + w.
    norm_plus_one: bool = False


_LLAMA_SEQ = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)



def _llama_awq(mlp_norm: str) -> tuple[ScaleMapping, ...]:
    return (
        ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleMapping(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleMapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    )


ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers", _LLAMA_SEQ,
             mlp_half=("post_attention_layernorm", "mlp"), awq=_llama_awq("post_attention_layernorm")),
    ArchSpec("gemma", ("gemma",), "model.layers", _LLAMA_SEQ, mlp_half=("post_attention_layernorm", "mlp"),
             awq=_llama_awq("post_attention_layernorm"), norm_plus_one=True),
    # Gemma 2/3's post_attention_layernorm normalises the attention output (a post-norm); the
    # MLP's inputs come from pre_feedforward_layernorm.
    ArchSpec("gemma2", ("gemma2", "gemma3_text"), "model.layers", _LLAMA_SEQ,
             mlp_half=("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
             awq=_llama_awq("pre_feedforward_layernorm"), norm_plus_one=True),
    ArchSpec(
        "opt",
        ("opt",),
        "model.decoder.layers",
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        mlp_half=("final_layer_norm", "fc1", "activation_fn", "fc2"),
        mlp_half_if="do_layer_norm_before",
        # fc1 -> fc2 holds because ReLU(x / s) = ReLU(x) / s for s > 0. The post-norm variant
        # (do_layer_norm_before false) breaks the norm mappings; the fold check catches it.
        awq=(
            ScaleMapping("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         "self_attn"),
            ScaleMapping("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
            ScaleMapping("final_layer_norm", ("fc1",), "fc1"),
            ScaleMapping("fc1", ("fc2",), "fc2"),
        ),
    ),
    ArchSpec(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        conv1d=True,
        mlp_half=("ln_2", "mlp"),
        # c_fc -> c_proj does not fold (GELU between them); c_attn fuses q, k and v.
        awq=(ScaleMapping("ln_1", ("attn.c_attn",), "attn"), ScaleMapping("ln_2", ("mlp.c_fc",), "mlp")),
    ),
)


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one we know how to stream."""


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHS for t in a.model_types)


def arch_for(model_type: str) -> ArchSpec:
    for a in ARCHS:
        if model_type in a.model_types:
            return a
    raise UnsupportedModelError(
        f"model_type '{model_type}' is not supported; supported: {', '.join(supported_model_types())}"
    )
