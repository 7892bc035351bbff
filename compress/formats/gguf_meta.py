"""What a GGUF file says besides its tensors: architecture keys, tensor names, the llama Q/K row
order, the tokenizer (`gguf_tokenizer`) and `general.*` provenance, as llama.cpp's convert_hf_to_gguf.py lays them out.

Families are data (`FAMILIES`): the GGUF architecture name, whether llama.cpp's rotary
layout needs q_proj/k_proj rows permuted, and what is added to norm weights (Gemma 3's
``1 + w``). Tensor names come from gguf-py's own `TensorNameMap`
(the table convert_hf_to_gguf uses), so `model.layers.3.self_attn.q_proj.weight` becomes
`blk.3.attn_q.weight` without a table of ours.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

# the tokenizer keys live in gguf_tokenizer; gguf.py reaches them through this module
from compress.formats.gguf_tokenizer import add_tokenizer, tokenizer_problem  # noqa: F401

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    arch: str  # general.architecture
    permute_qk: bool  # llama.cpp's llama arch rotates pairs (i, i + d/2) as (2i, 2i+1): rows reordered
    kv_length: bool = False  # attention.key_length/value_length written even when head_dim = hidden / heads
    # added to every `*norm.weight` in the file: HF Gemma 3's RMSNorm scales by (1 + w), llama.cpp's
    # by the stored weight (convert_hf_to_gguf's Gemma3Model.norm_shift)
    norm_shift: float = 0.0


FAMILIES = {
    # convert_hf_to_gguf: LlamaModel (also Mistral, SmolLM) -> "llama" with q/k permuted;
    # Qwen2Model -> "qwen2", Qwen3Model -> "qwen3", Gemma3Model -> "gemma3" (NEOX rope, rows as they are).
    "llama": Family("llama", True),
    "mistral": Family("llama", True),
    "qwen2": Family("qwen2", False),
    "qwen3": Family("qwen3", False, kv_length=True),
    "gemma3_text": Family("gemma3", False, kv_length=True, norm_shift=1.0),
}
GEMMA3_SWA_PATTERN = 6  # llama.cpp's gemma3 loader: layer i is global where i % 6 == 5 (no pattern key written)


def family_problem(config) -> Optional[str]:
    """Why this model cannot be written as GGUF (None when it can)."""
    mt = getattr(config, "model_type", "?")
    if mt not in FAMILIES:
        return (f"model_type '{mt}' has no GGUF mapping yet; GGUF export supports "
                f"{', '.join(sorted(FAMILIES))}")
    problem = _rope_problem(config)
    if problem:
        return f"{problem} (model_type '{mt}')"
    if FAMILIES[mt].arch == "gemma3":
        return _gemma3_problem(config)
    return None


def _gemma3_problem(config) -> Optional[str]:
    """What llama.cpp's gemma3 graph (src/models/gemma3.cpp) cannot express: it scales queries by
    1/sqrt(head_dim) (1/sqrt(hidden / heads) for the 62-layer 27B), makes every 6th layer global,
    and has no attention logit softcapping (convert_hf_to_gguf asserts it is unset)."""
    n = config.num_hidden_layers
    scalar = config.hidden_size // config.num_attention_heads if n == 62 else head_dim(config)
    if getattr(config, "query_pre_attn_scalar", scalar) != scalar:
        return (f"gemma3 query_pre_attn_scalar {config.query_pre_attn_scalar}: llama.cpp scales queries by "
                f"1/sqrt({scalar}) for this shape")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "gemma3 attn_logit_softcapping is set; llama.cpp's gemma3 has none"
    types = getattr(config, "layer_types", None)
    want = ["full_attention" if i % GEMMA3_SWA_PATTERN == GEMMA3_SWA_PATTERN - 1 else "sliding_attention"
            for i in range(n)]
    if getattr(config, "sliding_window", None) and types is not None and list(types) != want:
        return (f"gemma3 layer_types {list(types)}: llama.cpp makes every {GEMMA3_SWA_PATTERN}th layer "
                "global (sliding window pattern 6), this model does not")
    return None


def family(config) -> Family:
    problem = family_problem(config)
    if problem:
        raise ValueError(problem)
    return FAMILIES[config.model_type]


def _rope(config) -> dict[str, Any]:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


_ROPE_KINDS = ("full_attention", "sliding_attention")


def _rope_kinds(config) -> dict[str, dict[str, Any]]:
    """The rope parameters of each attention kind (Gemma 3 nests them per layer type; "" when
    one set serves every layer)."""
    rope = _rope(config)
    nested = {k: rope[k] for k in _ROPE_KINDS if isinstance(rope.get(k), dict)}
    return nested or {"": rope}


def _rope_problem(config) -> Optional[str]:
    """The rope scaling GGUF cannot carry (None when it can). llama.cpp reads one
    `rope.scaling.factor` for the full-attention layers and runs Gemma 3's sliding layers
    unscaled (src/models/gemma3.cpp keeps rope_freq_scale_train_swa at 1), so linear scaling is
    written for the full-attention (or the only) kind; YaRN, llama3 and the others are not yet."""
    for kind, rope in _rope_kinds(config).items():
        rtype = rope.get("rope_type", rope.get("type")) or "default"
        if rtype == "default" or (rtype == "linear" and kind != "sliding_attention" and rope.get("factor")):
            continue
        where = f" on the {kind} layers" if kind else ""
        return f"rope scaling '{rtype}'{where} is not written to GGUF yet"
    return None


def _rope_global(config) -> dict[str, Any]:
    """convert_hf_to_gguf's `rope_parameters.get("full_attention", rope_parameters)`."""
    rope = _rope(config)
    return dict(rope.get("full_attention", rope))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---- tensor names and row order ---------------------------------------------------------------
class Names:
    """HF state names <-> GGUF tensor names for one model."""

    def __init__(self, config) -> None:
        import gguf

        self.config = config
        self.family = family(config)
        arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[self.family.arch]
        self._map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    def gguf(self, hf_name: str) -> str:
        name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"tensor '{hf_name}' has no GGUF name for architecture '{self.family.arch}'")
        return name

    def row_order(self, hf_name: str, rows: int) -> Optional[torch.Tensor]:
        """Index `idx` with ``gguf_rows = hf_rows[idx]`` (None: same order). llama.cpp's
        convert_hf_to_gguf (LlamaModel.permute) regroups each head's rows (n_head, 2, d/2) ->
        (n_head, d/2, 2) for q_proj (query heads) and k_proj (key/value heads), weight and bias."""
        if not self.family.permute_qk:
            return None
        c = self.config
        if ".self_attn.q_proj." in hf_name:
            heads = c.num_attention_heads
        elif ".self_attn.k_proj." in hf_name:
            heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        else:
            return None
        return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)

    def shift(self, hf_name: str) -> float:
        """What the file adds to this tensor's values (convert_hf_to_gguf's norm_shift: every
        name ending in ``norm.weight``, for Gemma 3 the seven RMSNorms' ``1 + w``)."""
        return self.family.norm_shift if hf_name.endswith("norm.weight") else 0.0


# ---- key/value metadata -----------------------------------------------------------------------
def add_architecture(w, config) -> None:
    """`<arch>.*` keys (convert_hf_to_gguf's TextModel.set_gguf_parameters, LlamaModel's and
    Gemma3Model's). Gemma 3's embedding scale sqrt(hidden) is implicit in llama.cpp's arch."""
    import gguf

    fam = family(config)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    rope = _rope_global(config)
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    if rope.get("rope_type", rope.get("type")) == "linear":  # TextModel.set_gguf_parameters; Gemma 3 4B+: x8
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    local = _rope(config).get("sliding_attention", {}).get("rope_theta")
    if local is not None:
        w.add_rope_freq_base_swa(float(local))
    hd = head_dim(config)
    if hd != config.hidden_size // config.num_attention_heads or fam.kv_length:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if fam.arch == "llama":
        w.add_vocab_size(config.vocab_size)
        w.add_rope_dimension_count(hd)
    if fam.arch == "gemma3":
        if getattr(config, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if getattr(config, "sliding_window", None):
            w.add_sliding_window(int(config.sliding_window))


def add_general(w, source: dict[str, Any], method: str, gguf_type: str, version: str) -> None:
    """`general.*` provenance (GGUF spec, "General metadata")."""
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    name = source.get("name") or source.get("hub_id")
    if name:
        w.add_name(str(name))
    if source.get("license"):
        w.add_license(str(source["license"]))
    if source.get("hub_id"):
        w.add_base_model_count(1)
        w.add_base_model_name(0, str(source["hub_id"]).split("/")[-1])
        w.add_base_model_organization(0, str(source["hub_id"]).split("/")[0])
        w.add_base_model_repo_url(0, f"https://huggingface.co/{source['hub_id']}")
    w.add_quantized_by("compress")
    w.add_description(f"quantized by compress {version} with {method} on the GGUF {gguf_type} grid")
    w.add_string("compress.method", method)
    # llama-quantize's own names: a pure Q4_K/Q5_K/Q3_K file is its Q4_K_M/... ftype run with --pure
    ftype = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}.get(gguf_type, gguf_type)
    w.add_file_type(LlamaFileType[f"MOSTLY_{ftype}"].value)
    w.add_quantization_version(GGML_QUANT_VERSION)
