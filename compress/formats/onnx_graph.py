"""The decoder graph of an ONNX artifact, built node by node with `onnx.helper`.

Inputs and outputs follow onnxruntime-genai's decoder (its model builder's names):
``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, total] int64,
``past_key_values.N.key/value`` [batch, kv_heads, past, head_dim] -> ``logits``
[batch, seq, vocab] and ``present.N.key/value`` [batch, kv_heads, total, head_dim].

Per block (Llama, Mistral, Qwen2: RMSNorm, RoPE, GQA, SwiGLU), with the ORT contrib ops the
builder uses: ``SimplifiedLayerNormalization`` (RMSNorm; ``SkipSimplifiedLayerNormalization``
where a residual add precedes it, one pass over the hidden state), ``GroupQueryAttention``
(rotary from ``cos_cache``/``sin_cache``, the past/present cache, causal mask from
``seqlens_k``; q, k, v packed in one input when they are one op) and ``com.microsoft::MatMulNBits``
for each quantized linear (a plain ``MatMul`` for a linear left in float). Linears that read
the same input are one MatMulNBits where the writer could stack them (`FUSED`,
`matmulnbits.concat`), as the builder packs q/k/v: one dispatch, one int8 quantization of the
input (accuracy_level 4) and one act-order Gather instead of two or three. The head is a
``Gemm`` against the [vocab, hidden] table (``transB``), so a tied head reads the embedding
itself; a quantized tied head is the table (`DecoderGraph.embedding`). Initializers are not made here: the writer stores them as external data and passes
their names, types and shapes in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}  # model_type -> genai type
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NBITS = ".MatMulNBits"  # a quantized linear's tensors: <name>.MatMulNBits.{B,scales,zero_points,perm}
COS, SIN = "cos_cache", "sin_cache"
FINAL_NORM = "/model/norm/output_0"  # the head's input (evaluation reads it)
# linears of one input written as one MatMulNBits (rows stacked in this order) when they can be
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


@dataclass(frozen=True)
class NBitsLayer:
    K: int
    N: int
    bits: int
    block_size: int


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config) -> dict[str, Any]:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def family_problem(config) -> Optional[str]:
    """Why this model has no ONNX decoder mapping (None when it has)."""
    mt = getattr(config, "model_type", "?")
    if mt not in FAMILIES:
        return f"model_type '{mt}' has no ONNX mapping yet; ONNX export supports {', '.join(sorted(FAMILIES))}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act '{config.hidden_act}' is not mapped (SwiGLU with silu only)"
    rope = _rope(config).get("rope_type", "default")
    if rope in ("dynamic", "longrope"):
        return f"rope scaling '{rope}' depends on the sequence length; the graph holds one cos/sin table"
    if mt == "qwen2" and getattr(config, "use_sliding_window", False):
        return "qwen2 with use_sliding_window: true (per-layer windows) is not mapped"
    return None


def rotary_tables(config, max_positions: int):
    """cos/sin [positions, head_dim/2] from the model's own rotary module (its scaling included):
    GroupQueryAttention rotates the two halves of each head (``rotary_interleaved: 0``), as
    Hugging Face's ``rotate_half`` does."""
    import importlib

    import torch

    mod = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding"))
    rot = cls(config=config)
    pos = torch.arange(max_positions)[None]
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    half = head_dim(config) // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


class DecoderGraph:
    """Nodes of one decoder; `linear` decides per layer between MatMulNBits and MatMul."""

    def __init__(self, config, nbits: dict[str, NBitsLayer], stored: set[str], accuracy_level: int = 4):
        self.c = config
        self.nbits = nbits
        self.stored = stored  # initializer names the writer holds
        self.accuracy_level = accuracy_level
        self.nodes: list[Any] = []
        self._n = 0
        self._consts: set[str] = set()

    def _node(self, op: str, inputs: list[str], domain: str = "", n_out: int = 1, **attrs) -> list[str]:
        from onnx import helper

        self._n += 1
        outs = [f"/{op}_{self._n}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"/{op}_{self._n}", domain=domain, **attrs))
        return outs

    def _const(self, name: str, values: list[int]) -> str:
        from onnx import helper, TensorProto

        if name not in self._consts:
            self._consts.add(name)
            self.nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(
                name, TensorProto.INT64, [len(values)], values)))
        return name

    def linear(self, x: str, name: str) -> str:
        if name in self.nbits:
            m = self.nbits[name]
            if f"{name}{NBITS}.perm" in self.stored:  # act-order: columns in the order B holds them
                (x,) = self._node("Gather", [x, f"{name}{NBITS}.perm"], axis=-1)
            ins = [x, f"{name}{NBITS}.B", f"{name}{NBITS}.scales"]
            if f"{name}{NBITS}.zero_points" in self.stored:
                ins.append(f"{name}{NBITS}.zero_points")
            (y,) = self._node("MatMulNBits", ins, "com.microsoft", K=m.K, N=m.N, bits=m.bits,
                              block_size=m.block_size, accuracy_level=self.accuracy_level)
        else:  # left in float (a skipped layer): the writer stored its weight as [in, out]
            (y,) = self._node("MatMul", [x, f"{name}.weight"])
        if f"{name}.bias" in self.stored:
            (y,) = self._node("Add", [y, f"{name}.bias"])
        return y

    def rms(self, x: str, weight: str) -> str:
        return self._node("SimplifiedLayerNormalization", [x, weight], axis=-1,
                          epsilon=float(self.c.rms_norm_eps), stash_type=1)[0]

    def add_rms(self, h: str, y: str, weight: str) -> tuple[str, str]:
        """(RMSNorm(h + y), h + y) in one op."""
        out = self._node("SkipSimplifiedLayerNormalization", [h, y, weight], "com.microsoft", n_out=4,
                         epsilon=float(self.c.rms_norm_eps))
        self.nodes[-1].output[1] = self.nodes[-1].output[2] = ""  # mean, inverse std: not needed
        return out[0], out[3]

    def linears(self, x: str, prefix: str, fused: str) -> list[str]:
        """The outputs of the linears `FUSED[fused]` of input `x`: one op split in parts, or one op each."""
        if prefix + fused not in self.nbits:
            return [self.linear(x, prefix + n) for n in FUSED[fused]]
        y = self.linear(x, prefix + fused)
        if fused == "self_attn.qkv_proj":
            return [y, "", ""]  # GroupQueryAttention takes q, k, v packed in its first input
        i = self.nbits[prefix + fused].N // 2  # gate and up: equal halves
        return self._node("Split", [y, self._const(f"/const/split{i}", [i, i])], n_out=2, axis=-1)

    def embedding(self, table: Optional[str], head: str) -> str:
        """The rows of `input_ids`: a ``Gather`` from the float `table`, or (None: a tied table
        stored once as the quantized `head`) ``GatherBlockQuantized`` from the head's MatMulNBits
        codes, viewed as [N, blocks * block_size * bits / 8], its scales and zero points; the
        padding of the last block is sliced off."""
        if table is not None:
            return self._node("Gather", [table, "input_ids"], axis=0)[0]
        m, p = self.nbits[head], f"{head}{NBITS}"
        padded = -(-m.K // m.block_size) * m.block_size
        rows = self._node("Reshape", [f"{p}.B", self._const(f"/const/table{m.N}x{padded}x{m.bits}",
                                                            [m.N, padded * m.bits // 8])])[0]
        ins = [rows, "input_ids", f"{p}.scales"]
        if f"{p}.zero_points" in self.stored:
            ins.append(f"{p}.zero_points")
        (x,) = self._node("GatherBlockQuantized", ins, "com.microsoft", bits=m.bits, block_size=m.block_size,
                          gather_axis=0, quantize_axis=1)
        if padded != m.K:
            (x,) = self._node("Slice", [x, self._const("/const/zero", [0]), self._const(f"/const/k{m.K}", [m.K]),
                                        self._const("/const/minus1", [-1])])
        return x

    def build(self, embed: Optional[str], head: str, blocks_prefix: str, final_norm: str):
        from onnx import TensorProto, helper

        c = self.c
        L, kvh, hd = c.num_hidden_layers, c.num_key_value_heads, head_dim(c)
        one = self._const("/const/one", [1])
        mask_sum = self._node("ReduceSum", ["attention_mask", one], keepdims=0)[0]
        seqlens_k = self._node("Cast", [self._node("Sub", [mask_sum, one])[0]], to=TensorProto.INT32)[0]
        total = self._node("Gather", [self._node("Shape", ["attention_mask"])[0], self._const("/const/idx1", [1])],
                           axis=0)[0]
        total = self._node("Cast", [self._node("Squeeze", [total])[0]], to=TensorProto.INT32)[0]
        h = self.embedding(embed, head)
        window = getattr(c, "sliding_window", None) if c.model_type == "mistral" else None
        x = self.rms(h, f"{blocks_prefix}.0.input_layernorm.weight")
        for i in range(L):
            p = f"{blocks_prefix}.{i}."
            qkv = self.linears(x, p, "self_attn.qkv_proj")
            attn = self._node(
                "GroupQueryAttention",
                [*qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total, COS, SIN],
                "com.microsoft", n_out=3, num_heads=c.num_attention_heads, kv_num_heads=kvh,
                scale=float(hd ** -0.5), do_rotary=1, rotary_interleaved=0,
                local_window_size=int(window) if window else -1)
            self.nodes[-1].output[1], self.nodes[-1].output[2] = f"present.{i}.key", f"present.{i}.value"
            x, h = self.add_rms(h, self.linear(attn[0], p + "self_attn.o_proj"), p + "post_attention_layernorm.weight")
            g, u = self.linears(x, p, "mlp.gate_up_proj")
            act = self._node("Mul", [self._node("Mul", [g, self._node("Sigmoid", [g])[0]])[0], u])[0]
            norm = f"{blocks_prefix}.{i + 1}.input_layernorm.weight" if i + 1 < L else final_norm
            x, h = self.add_rms(h, self.linear(act, p + "mlp.down_proj"), norm)
        x = self.nodes[-1].output[0] = FINAL_NORM
        flat = self._node("Reshape", [x, self._const("/const/flat", [-1, c.hidden_size])])[0]
        # a quantized head (`quantize.lm_head`) is one more MatMulNBits; else Gemm against the table
        logits = self.linear(flat, head) if head in self.nbits else self._node("Gemm", [flat, head], transB=1)[0]
        shape = self._node("Concat", [self._node("Shape", ["input_ids"])[0],
                                      self._const("/const/vocab", [c.vocab_size])], axis=0)[0]
        self.nodes.append(helper.make_node("Reshape", [logits, shape], ["logits"], name="/logits"))

        kv = ["batch_size", kvh, "past_sequence_length", hd]
        present = ["batch_size", kvh, "total_sequence_length", hd]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 ["batch_size", "sequence_length", c.vocab_size])]
        for i in range(L):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present))
        return inputs, outputs


def genai_config(config, generation: dict[str, Any], filename: str) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for this decoder (the fields its builder writes)."""
    c = config
    ctx = int(c.max_position_embeddings)
    eos = generation.get("eos_token_id", getattr(c, "eos_token_id", None))
    pad = generation.get("pad_token_id", getattr(c, "pad_token_id", None))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {
        "model": {
            "bos_token_id": generation.get("bos_token_id", getattr(c, "bos_token_id", None)),
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename, "head_size": head_dim(c), "hidden_size": c.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
                "num_key_value_heads": c.num_key_value_heads,
            },
            "eos_token_id": eos, "pad_token_id": pad, "type": FAMILIES[c.model_type], "vocab_size": c.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
