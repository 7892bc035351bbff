"""`quantize.target` and `quantize.target_options`: the budget a mixed-precision plan must fit,
and the grid of options per linear the allocation chooses from (config only, no torch)."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _group_size(v: int) -> int:  # as compress.quantizers.base.check_group_size (no import cycle)
    if v != -1 and (v < 8 or v & (v - 1)):
        raise ValueError("must be -1 (per output channel) or a power of two >= 8 (32, 64, 128, ...)")
    return v


class Target(_Strict):
    """Exactly one budget: bytes of the artifact's tensors, bits per quantizable linear weight,
    or a GPU whose memory must hold weights + KV cache + `serving.overhead_gb`."""

    max_bytes: Optional[int] = Field(None, gt=0, description="Tensor bytes of the whole artifact (safetensors data)")
    bits_per_weight: Optional[float] = Field(
        None, gt=0, le=32,
        description="Bits per weight averaged over the linears the plan quantizes (codes, scales, zeros, g_idx)",
    )
    gpu: Optional[str] = Field(None, description="A GPU of serving.gpus (configs/gpus.yaml): its name or a unique part of it")
    context_length: Optional[int] = Field(None, ge=1, description="With gpu: tokens of KV cache per sequence (default serving.context_length)")
    batch: Optional[int] = Field(None, ge=1, description="With gpu: sequences served at once (default serving.batch)")

    @model_validator(mode="after")
    def _one(self) -> "Target":
        given = [k for k in ("max_bytes", "bits_per_weight", "gpu") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of max_bytes, bits_per_weight, gpu (got {given or 'none'})")
        if self.gpu is None and (self.context_length is not None or self.batch is not None):
            raise ValueError("context_length and batch go with gpu only")
        return self

    def label(self) -> str:
        """A short tag for candidate names: `mb1.5`, `bpw3.5`, `gpu`."""
        if self.max_bytes is not None:
            return f"mb{self.max_bytes / 1e6:g}"
        if self.bits_per_weight is not None:
            return f"bpw{self.bits_per_weight:g}"
        return "gpu"


_Bits = Literal[2, 3, 4, 5, 6, 8]


class TargetOptions(_Strict):
    """The options per quantizable linear: every `bits` x `group_sizes` (the plan's `sym`),
    plus leaving the layer in float. Options a layer or the format cannot hold are dropped for
    that layer."""

    bits: Optional[list[_Bits]] = Field(
        None, min_length=1, description="Default [2, 3, 4, 8]; under a k-quant export.gguf_type "
        "[2, 3, 4, 5, 6, 8], each naming a GGUF type (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0; a row length "
        "that is not a multiple of 256 takes llama-quantize's fallback, Q4_K -> Q5_0). 5 and 6 name "
        "k-quants only: other formats drop them, as any option a layer or the format cannot hold",
    )
    group_sizes: Optional[list[Annotated[int, AfterValidator(_group_size)]]] = Field(
        None, min_length=1, description="Default: the plan's group_size and -1 (per output channel)",
    )
    unquantized: bool = Field(True, description="Whether leaving a linear in float is an option")
    # block_kl by measurement, on SmolLM2-135M (16 calibration windows, 8 x 512 evaluation,
    # kl_windows 2; KL of the allocation at uniform W3 g64's / W4 g64's bytes over uniform's):
    #   GPTQ: block_kl 0.948 / 0.867, fisher 0.988 / 1.012, relative_output_error 1.281 / 0.958;
    #         Pearson r (log predicted, log KL, 8 allocations) 0.960, 0.939, 0.946.
    #   RTN:  block_kl 1.089 / 1.043, fisher 1.084 / 0.918, relative_output_error 1.366 / 1.421;
    #         Pearson r (10 allocations) 0.936, 0.978, 0.919.
    # block_kl is best against GPTQ (issue 17's targets), fisher against RTN.
    predictor: Literal["output_error", "relative_output_error", "block_kl", "fisher"] = Field(
        "block_kl",
        description="What the allocation minimises per layer: 'block_kl' (default), tr((W-Q) H (W-Q)^T) "
        "over the output's own energy tr(W H W^T), times its block's measured KL per unit of that "
        "(the whole-model KL with only that block at the reference option); 'fisher', "
        "1/2 E[(g . (W-Q) x)^2], g the gradient at the layer's output of the log-probability of a label "
        "drawn from the model (its Fisher information: the predicted KL); 'relative_output_error', "
        "without the block's factor; 'output_error', unnormalised",
    )
    reference_bits: Optional[_Bits] = Field(
        None, description="block_kl: bits of the reference option each block's KL is measured at "
        "(group size and symmetry the plan's); default the plan's bits",
    )
    kl_windows: int = Field(
        2, ge=1, description="block_kl, fisher: calibration windows the KL is measured or predicted over "
        "(block_kl: n_blocks^2/2 block forwards over them; fisher: about three forward passes; both "
        "hold n_blocks + 1 of their hidden states)",
    )

    outer_bits: Optional[list[Literal[4, 8]]] = Field(
        None, description="Bits the input embedding and the lm_head may take (on group_sizes), besides "
        "staying in export.dtype, where export.format stores them quantized (compressed-tensors: an "
        "8-bit symmetric embedding; a head on any grid; onnx: a head of 4 or 8 bits, which a tied table "
        "is stored once as). Their predicted loss is the whole-model KL "
        "measured with only that tensor quantized, so they need a predictor in units of KL (block_kl, "
        "fisher), and a byte budget (max_bytes, gpu). Default [4, 8] where that holds, else none; [] "
        "keeps them as quantize.embedding and quantize.lm_head say",
    )

    outer_choice: Literal["measured", "predicted"] = Field(
        "measured", description="How the embedding/head option is chosen where it is one: 'measured' "
        "(default) allocates the linears under the bytes each option leaves and keeps the option whose "
        "whole allocation, every tensor rounded to nearest at once, has the lowest KL over kl_windows "
        "calibration windows (one more block walk); 'predicted' takes the lowest summed prediction",
    )

    @field_validator("bits", "group_sizes", "outer_bits")
    @classmethod
    def _unique(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"duplicate entries in {v}")
        return v


    def outer(self, target: "Target") -> list[int]:
        """The bits the embedding and head may take under `target` (see `outer_bits`)."""
        if target.bits_per_weight is not None or self.predictor not in KL_PREDICTORS:
            return []
        return [4, 8] if self.outer_bits is None else list(self.outer_bits)


KL_PREDICTORS = ("block_kl", "fisher")
