"""The planner at 8B scale, without weights: an 8B-shaped Llama skeleton (meta tensors),
`target: {gpu: "RTX 4060", context_length: 8192}` gives an allocation whose computed serving
memory fits 8 GB."""
from __future__ import annotations

import torch

from compress.config import parse_config
from compress.formats.registry import get_format
from compress.mixed.allocate import allocate
from compress.mixed.plan import budget, fixed_bytes, slots
from compress.models.arch import arch_for
from compress.serving import attention_shape, fits, load_gpus, serving_need


class Skeleton:
    """What the planner reads off a `StreamedModel`: blocks as templates, the outer modules."""

    def __init__(self, config):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        self.arch = arch_for(config.model_type)
        self.templates = list(self.model.get_submodule(self.arch.blocks))
        self.n_blocks = len(self.templates)
        self.block_prefix = self.arch.blocks + "."


def llama_8b(export: dict):
    """An 8B-shaped Llama skeleton and a GPTQ W4 g128 run config targeting an RTX 4060 at 8k."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False)
    cfg = parse_config({"model": {"source": "x"}, "export": export, "quantize": {
        "method": "gptq", "bits": 4, "group_size": 128,
        "target": {"gpu": "RTX 4060", "context_length": 8192}}})
    sm = Skeleton(config)
    fmt = get_format(cfg.export.format)
    return config, cfg, cfg.quantize, sm, fmt, slots(sm, cfg.quantize, fmt, torch.float16, with_bias=True)


def test_rtx_4060_at_8k_context_fits_8_gb():
    config, cfg, q, sm, fmt, s = llama_8b({})
    assert len(s) == 32 * 7
    fixed = fixed_bytes(sm, {x.name for x in s}, torch.float16)
    assert fixed == 2 * (2 * 128256 * 4096 + 4096 + 32 * 2 * 4096)  # embeddings, head, norms in fp16
    b = budget(q.target, cfg, config, s, fixed)
    # A loss that falls with bits, larger for wider layers: any monotone stand-in does here.
    losses = [[0.0 if o is None else x.weights * 4.0 ** -o.bits * (1.5 if o.group_size == -1 else 1.0)
               for o in x.options] for x in s]
    alloc = allocate([x.bytes for x in s], losses, b.slots_bytes)
    weights = fixed + alloc.bytes
    need = serving_need(weights, attention_shape(config),
                        cfg.serving.model_copy(update={"context_length": 8192}))
    assert need.kv_cache_bytes == 2 * 32 * 8 * 128 * 8192 * 2
    fit = fits(need, load_gpus())
    assert fit[0] == "8 GB (RTX 4060, RTX 3070)"
    assert need.total_bytes > 8 * 2**30 - 2**26  # the budget is used, not left lying (64 MiB)
    assert 4 in {getattr(s[i].options[o], "bits", None) for i, o in enumerate(alloc.choice)}


def test_rtx_4060_with_the_embedding_and_head_as_options():
    """The same budget with the embedding and head as options (`target_options.outer_bits`):
    quantizing them (2 x 1 GB in fp16 at 8B) leaves the linears more, and the whole still fits."""
    from compress.mixed.plan import outer_slot

    config, cfg, q, sm, fmt, s = llama_8b({"format": "compressed-tensors"})
    outer = outer_slot(sm, q, fmt, torch.float16, cfg.export)
    assert outer is not None and outer.bytes[outer.options.index((None, None))] == 2 * (2 * 128256 * 4096 + 4096)
    fixed = fixed_bytes(sm, {x.name for x in s}, torch.float16, q, fmt, outer=False)
    assert fixed == 2 * 32 * 2 * 4096  # the blocks' norms only
    b = budget(q.target, cfg, config, s, fixed)
    loss = lambda spec, n: 0.0 if spec is None else n * 4.0 ** -spec.bits  # noqa: E731
    losses = [[loss(o, x.weights) for o in x.options] for x in s]
    losses.append([loss(e, 128256 * 4096) + loss(h, 128256 * 4096) for e, h in outer.options])
    alloc = allocate([x.bytes for x in s] + [outer.bytes], losses, b.slots_bytes)
    emb, head = outer.options[alloc.choice[-1]]
    assert emb is not None and head is not None  # 2 GB of float tables do not pay at 8 GB
    need = serving_need(fixed + alloc.bytes, attention_shape(config),
                        cfg.serving.model_copy(update={"context_length": 8192}))
    assert fits(need, load_gpus())[0] == "8 GB (RTX 4060, RTX 3070)"
