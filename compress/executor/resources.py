"""What one candidate task holds in memory, from the model's shape and the plan: the figure a
Ray task requests (`memory=`), and the numbers behind docs/ray.md's 70B plan.

The pipeline streams one decoder block at a time, so a task's peak is the runtime plus the
larger of its two phases (the block-streaming engine holds nothing else):

    quantize  = 3 x block (the block's weights, the quantized copy the next block is fed
                from, the packed codes on their way to the writer)
              + 2 x the largest Hessian in float32 (the statistic and GPTQ's inverse), for
                methods that read it
              + the calibration stream when it waits in memory (nsamples x seqlen x hidden x
                bytes; on disk only one batch of 8 windows is resident)
    evaluate  = 2 x block (the original's and the candidate's)
              + 2 x head inputs in float32 (windows x seqlen x hidden: the original's, handed
                to the task, and the candidate's)
              + one vocabulary slice of both heads (ROWS x hidden) and its logits

The runtime (Python, torch, transformers) measured 415-454 MiB on CPU (README, memory_scaling);
a CUDA context adds about 0.5 GiB more. A margin of 25% covers allocator slack.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MIB = 2**20
GIB = 2**30
RUNTIME_BYTES = 460 * MIB
CUDA_CONTEXT_BYTES = 512 * MIB
MARGIN = 1.25
BATCH_WINDOWS = 8  # what a spooled stream keeps resident (compress/activations.py reads 8 at a time)


@dataclass(frozen=True)
class ModelShape:
    """The sizes the memory model needs, read from a transformers config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> "ModelShape":
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()

        def first(*names: str, default: Optional[int] = None) -> Optional[int]:
            for n in names:
                v = getattr(config, n, None)
                if v is not None:
                    return int(v)
            return default

        hidden = first("hidden_size", "n_embd")
        heads = first("num_attention_heads", "n_head")
        return cls(
            layers=first("num_hidden_layers", "n_layer"), hidden=hidden,
            intermediate=first("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
            heads=heads, kv_heads=first("num_key_value_heads", default=heads),
            head_dim=first("head_dim", default=hidden // heads), vocab=first("vocab_size"),
        )

    @property
    def block_params(self) -> int:
        """Weights of one decoder block: attention (q, o full; k, v per KV head) and a gated MLP
        (gate, up, down; a 2-matrix MLP is counted as 3, an upper bound). Norms are negligible."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        return 2 * q + kv + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        return self.layers * self.block_params + 2 * self.vocab * self.hidden  # untied embedding + head


@dataclass(frozen=True)
class TaskMemory:
    """Bytes one candidate task holds at its peak, by part (see the module docstring)."""

    runtime: int
    block: int
    hessians: int
    calibration_stream: int
    head_inputs: int
    vocab_slice: int
    quantize_phase: int
    evaluate_phase: int

    @property
    def peak(self) -> int:
        return self.runtime + max(self.quantize_phase, self.evaluate_phase)

    @property
    def request(self) -> int:
        """What the task asks the scheduler for: the peak and the margin."""
        return int(self.peak * MARGIN)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("runtime", "block", "hessians", "calibration_stream", "head_inputs",
                                               "vocab_slice", "quantize_phase", "evaluate_phase", "peak", "request")}


def task_memory(shape: ModelShape, dtype_bytes: int, *, hessian: bool, calibration: Optional[tuple[int, int]],
                stream_in_memory: bool, evaluation: Optional[tuple[int, int]], cuda: bool = False) -> TaskMemory:
    """The memory model above. `calibration` and `evaluation`: (windows, seqlen), None when the
    plan reads no calibration data or evaluation is off."""
    block = shape.block_params * dtype_bytes
    widest = max(shape.hidden, shape.intermediate, shape.heads * shape.head_dim)
    hessians = 2 * widest * widest * 4 if hessian else 0
    stream = 0
    if calibration is not None:
        n, seqlen = calibration
        stream = (n if stream_in_memory else min(n, BATCH_WINDOWS)) * seqlen * shape.hidden * dtype_bytes
    heads = vocab = 0
    if evaluation is not None:
        windows, seqlen = evaluation
        heads = 2 * windows * seqlen * shape.hidden * 4
        from compress.evaluate.vocab_stream import ROWS

        vocab = 2 * ROWS * shape.hidden * dtype_bytes + seqlen * ROWS * 4 * 2
    runtime = RUNTIME_BYTES + (CUDA_CONTEXT_BYTES if cuda else 0)
    return TaskMemory(runtime, block, hessians, stream, heads, vocab,
                      quantize_phase=3 * block + hessians + stream,
                      evaluate_phase=2 * block + heads + vocab)


def plan_memory(cfg, config, plan, device_type: str) -> TaskMemory:
    """`task_memory` for one candidate of a run: `cfg` the RunConfig, `config` the model's
    transformers config, `plan` the candidate's Plan."""
    import torch

    from compress.quantizers import get_method

    method = get_method(plan.q.method)
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    dtype_bytes = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    reads = method.needs_calibration or plan.q.target is not None
    mode = cfg.calibration.activations
    in_memory = mode == "memory" or (mode == "auto" and device_type == "cuda")
    e = cfg.evaluate
    return task_memory(
        ModelShape.of(config), dtype_bytes, hessian=plan.q.method == "gptq" or getattr(plan.q, "rounding", None) == "gptq",
        calibration=(cfg.calibration.nsamples, cfg.calibration.seqlen) if reads else None,
        stream_in_memory=in_memory, evaluation=(e.windows, e.seqlen) if e.enabled else None,
        cuda=device_type == "cuda",
    )
