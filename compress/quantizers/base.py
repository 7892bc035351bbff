"""The method contract: what a quantization method declares, and the registry that holds them.

A method is a pure per-weight function plus declarations the engine acts on:

- ``config``: its own pydantic model, a member of the union discriminated on ``method`` that
  the run config, candidates and sweeps are derived from (``compress.config``);
- ``stats``: what the engine collects from the calibration stream for each linear before
  calling it (nothing, the input Hessian, or per-channel input magnitudes), or a function of
  the method's config that says which (AWQ needs the Hessian only for GPTQ rounding or clipping);
- ``block_transform``: an optional function applied to each loaded decoder block before its
  weights are quantized (scale folding such as AWQ's or SmoothQuant's goes here);
- ``quantize``: ``(W, LayerStats, spec) -> QuantResult``, tensors in and out.

The grid (``QuantSpec``) is what every format must be able to hold; method options (GPTQ's
damping, ...) live in the method's own spec subclass, which the config builds per layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.mixed.target import KL_PREDICTORS, Target, TargetOptions

if TYPE_CHECKING:  # torch stays out of config parsing until a method module imports it
    import torch

    from compress.formats.qweight import QuantizedWeight


# ---- the grid ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ActivationScheme:
    """How a layer's inputs are quantized at run time (W8A8): each token's input vector gets
    its own symmetric int8 scale, computed on the fly (compressed-tensors' ``strategy: token,
    dynamic: true``)."""

    bits: int = 8
    strategy: str = "token"
    dynamic: bool = True
    sym: bool = True


@dataclass(frozen=True)
class QuantSpec:
    """The quantization grid of one linear layer (after per-module overrides): the weights'
    grid and, for weight-and-activation methods, how its inputs are quantized at run time."""

    bits: int
    group_size: int = 128  # -1: one group per output channel
    sym: bool = True
    activations: Optional[ActivationScheme] = None
    # A GGUF block grid (`kgrid.GRIDS`: Q4_K, Q6_K, Q5_0, ...) that replaces the uniform grid;
    # bits, group_size (its sub-block) and sym are then the grid's own.
    gguf_grid: Optional[str] = None

    def groups_for(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def check_divides(self, in_features: int, layer: str) -> None:
        if self.group_size != -1 and in_features % self.group_size:
            raise ValueError(
                f"quantize.group_size: {self.group_size} does not divide the input size "
                f"{in_features} of layer '{layer}'; choose a divisor or add an override for it"
            )

    @property
    def permutes_columns(self) -> bool:
        """Whether the method may store a permuted g_idx (columns grouped out of order)."""
        return False

    @property
    def grid(self) -> "QuantSpec":
        """Only the grid, without any method options a subclass adds."""
        return QuantSpec(self.bits, self.group_size, self.sym, self.activations, self.gguf_grid)

    def on_gguf_grid(self, name: Optional[str]) -> "QuantSpec":
        """This spec (method options kept) on GGUF block grid `name` (None: unchanged)."""
        import dataclasses

        if name is None:
            return self
        from compress.quantizers.kgrid import get_grid

        g = get_grid(name)
        return dataclasses.replace(self, bits=g.bits, group_size=g.sub, sym=g.sym, gguf_grid=name)


# ---- statistics and results ----------------------------------------------------------------
StatKind = Literal["none", "hessian", "act_magnitude", "act_absmax"]


@dataclass(frozen=True)
class LayerStats:
    """What the calibration stream told the engine about one linear's inputs.

    hessian        [in, in]  ``2/n sum x x^T`` (``HessianAccumulator``)
    act_magnitude  [in]      mean |x| per input channel (``ChannelMagnitude``)
    act_absmax     [in]      max |x| per input channel (``ChannelAbsMax``)
    """

    hessian: Optional["torch.Tensor"] = None
    act_magnitude: Optional["torch.Tensor"] = None
    act_absmax: Optional["torch.Tensor"] = None


NO_STATS = LayerStats()


@dataclass(frozen=True)
class QuantResult:
    """A method's answer for one weight: the codes and grid, and the spec actually used."""

    weight: "QuantizedWeight"
    spec: QuantSpec


class NumericalError(RuntimeError):
    """A method could not quantize a layer for numerical reasons; the engine falls back to
    round-to-nearest for that layer and says which config key to change."""


# ---- configuration -----------------------------------------------------------------------
class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _error_at(title: str, loc: tuple[str, ...], value: Any, message: str) -> ValidationError:
    """A validation error at a sub-key of the model being validated, so the config error names
    the full key path (`quantize.lm_head.rounding`), not the model's."""
    from pydantic_core import InitErrorDetails, PydanticCustomError

    return ValidationError.from_exception_data(title, [InitErrorDetails(
        type=PydanticCustomError("invalid_combination", message), loc=loc, input=value)])


def check_group_size(v: int) -> int:
    if v != -1 and (v < 8 or v & (v - 1)):
        raise ValueError("must be -1 (per output channel) or a power of two >= 8 (32, 64, 128, ...)")
    return v


GroupSize = Annotated[int, AfterValidator(check_group_size)]
Bits = Literal[2, 3, 4, 8]
# the names of `compress.quantizers.kgrid.GRIDS` (kept literal: config parsing imports no torch)
GGUFGrid = Literal["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "IQ4_NL"]


class Override(StrictModel):
    pattern: str = Field(description="Regular expression matched against full module names")
    bits: Optional[Bits] = None
    group_size: Optional[GroupSize] = None
    sym: Optional[bool] = None
    gguf_type: Optional[GGUFGrid] = Field(
        None, description="A GGUF block grid for these layers (export.format: gguf with a k-quant "
        "gguf_type); it sets bits, group_size and sym itself",
    )
    skip: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v


HeadRounding = Literal["rtn", "gptq"]


class OuterQuant(StrictModel):
    """How a tensor outside the decoder blocks is stored (`quantize.lm_head`): on the blocks'
    grid (`compress.quantizers.grid`), rounded to nearest or by GPTQ against the Hessian of
    what the head receives. Unset `group_size` / `sym` / `rounding` take the plan's."""

    bits: Bits
    group_size: Optional[GroupSize] = None
    sym: Optional[bool] = None
    rounding: Optional[HeadRounding] = Field(
        None, description="rtn, or gptq (the Hessian of the final norm's output over the calibration windows). "
        "Default: gptq for a method that reads calibration data (gptq, awq, smoothquant), as GPTQModel "
        "quantizes a head it is asked to; rtn for rtn",
    )

    def spec(self, plan: "MethodConfig") -> QuantSpec:
        gs = plan.group_size if self.group_size is None else self.group_size
        return QuantSpec(self.bits, gs, bool(plan.sym) if self.sym is None else self.sym)

    def rounding_for(self, plan: "MethodConfig") -> HeadRounding:
        """The rounding used: the set one, else GPTQ wherever the plan has a calibration stream."""
        if self.rounding is not None:
            return self.rounding
        return "gptq" if isinstance(plan, CalibratedConfig) else "rtn"

    def label(self, plan: "MethodConfig", what: str, rounded: bool = True) -> str:
        """Candidate-name part: `head8`, plus the group, grid and rounding where they differ from
        the plan's (the rounding: from the method's natural choice, `rounding_for`; none where
        there is no choice, `rounded=False`: the embedding)."""
        s = self.spec(plan)
        gs = "" if s.group_size == plan.group_size else ("ch" if s.group_size == -1 else f"g{s.group_size}")
        grid = "" if s.sym == bool(plan.sym) else ("sym" if s.sym else "asym")
        natural = OuterQuant(bits=self.bits).rounding_for(plan)
        rounding = "" if not rounded or self.rounding_for(plan) == natural else self.rounding_for(plan)
        return f"{what}{s.bits}{gs}{grid}{rounding}"


class MethodConfig(StrictModel):
    """Settings every method has: the grid, and which layers get which grid.

    A method's config subclasses this (or `CalibratedConfig`) and narrows ``method`` to a
    ``Literal`` of its registered name, which is the union's discriminator."""

    method: str
    bits: Bits = 4
    group_size: GroupSize = 128
    sym: Optional[bool] = Field(
        None, description="Symmetric grids (zero point fixed at 2**(bits-1)) or asymmetric (a zero point "
        "per group). Default: asymmetric, which measured 0.79x the KL of symmetric for GPTQ W4 g64 on "
        "SmolLM2-135M at equal GPTQ bytes; symmetric where the export format holds only that (GGUF Q4_0/Q8_0)",
    )
    skip: list[str] = Field(default_factory=list, description="Regexes of linear layers kept unquantized")
    overrides: list[Override] = Field(default_factory=list)
    target: Optional[Target] = Field(
        None, description="A budget (max_bytes, bits_per_weight, or gpu) that chooses bits and group size "
        "per linear from target_options by predicted loss; written as exact-name overrides",
    )
    target_options: TargetOptions = Field(default_factory=TargetOptions)
    lm_head: Optional[OuterQuant] = Field(
        None, description="Quantize the lm_head too (bits, group_size, sym and rounding, unset ones the "
        "plan's); a tied embedding stays in export.dtype for the lookup and the artifact stores the "
        "head as its own tensor. Default: the head stays in export.dtype",
    )
    embedding: Optional[OuterQuant] = Field(
        None, description="Quantize the input embedding too (bits, group_size, sym; rounded to nearest: a "
        "lookup has no Hessian). The artifact unties a tied head, which is then stored as quantize.lm_head "
        "says (else in export.dtype). Default: the embedding stays in export.dtype",
    )

    @model_validator(mode="after")
    def _head_rounding_has_statistics(self) -> "MethodConfig":
        # GPTQ needs the head inputs' Hessian, which only a calibrated method's block walk
        # produces; rtn never embeds the calibration windows, and running every block just for
        # the head is the cost of a calibrated method, so that is what the message asks for.
        if self.lm_head is not None and self.lm_head.rounding == "gptq" and not isinstance(self, CalibratedConfig):
            raise _error_at(type(self).__name__, ("lm_head", "rounding"), "gptq", (
                f"gptq needs the Hessian of the head's inputs over the calibration windows, which method "
                f"'{self.method}' does not collect; choose a calibrated method (gptq, awq: their head rounds "
                f"by GPTQ by default) or rounding: rtn"))
        o = self.target_options
        if o.outer_bits and o.predictor not in KL_PREDICTORS:
            raise _error_at(type(self).__name__, ("target_options", "outer_bits"), o.outer_bits, (
                f"the embedding's and head's predicted loss is a measured KL, which only predictors "
                f"{', '.join(KL_PREDICTORS)} add to; predictor is {o.predictor!r}"))
        if self.target is not None and self.target.bits_per_weight is not None and self.target_options.outer_bits:
            raise _error_at(type(self).__name__, ("target_options", "outer_bits"), self.target_options.outer_bits, (
                "bits_per_weight averages over the linears only; the embedding and head are options of a byte "
                "budget (max_bytes, gpu)"))
        if self.embedding is not None and self.embedding.rounding == "gptq":
            raise _error_at(type(self).__name__, ("embedding", "rounding"), "gptq", (
                "the embedding is a lookup, with no inputs to weigh its rounding by; use rounding: rtn "
                "(or leave it out)"))
        return self

    def spec(self, bits: int, group_size: int, sym: bool) -> QuantSpec:
        """The spec handed to the method for one layer (a subclass adds its options)."""
        return QuantSpec(bits=bits, group_size=group_size, sym=sym)

    def name_parts(self) -> list[str]:
        """Extra parts of the candidate's default name (GPTQ marks a permuted g_idx)."""
        return []


class CalibratedConfig(MethodConfig):
    """Settings of a method that reads statistics of the calibration stream."""

    propagate: bool = Field(True, description="Feed quantized outputs to later sub-layers and blocks")
    hessian_dtype: Literal["float32", "float64"] = "float32"


# ---- the registry ------------------------------------------------------------------------
QuantizeFn = Callable[["torch.Tensor", LayerStats, QuantSpec], QuantResult]


@dataclass(frozen=True)
class BlockView:
    """What a block transform may use: the loaded block (modules to rescale in place), its
    architecture data, the method's config, the calibration stream holding the block's
    inputs, and the engine's pass that collects statistics of named sub-layers."""

    index: int
    block: Any  # torch.nn.Module
    arch: Any  # compress.models.arch.ArchSpec
    config: MethodConfig
    inputs: Any  # compress.activations.WindowStream
    collect: Callable[[list[str], StatKind], dict[str, Any]]
    # The block's output for one batch ``[b, L, D]`` of windows read off ``inputs`` (the engine
    # supplies the masks and rotary tables); an exception raised by a hook inside propagates.
    forward: Optional[Callable[["torch.Tensor"], "torch.Tensor"]] = None
    batch_size: int = 1  # windows per forward, as the engine runs them


BlockTransform = Callable[[BlockView], None]
StatsDecl = Union[StatKind, Callable[[MethodConfig], StatKind]]


@dataclass(frozen=True)
class Method:
    name: str
    config: type[MethodConfig]
    quantize: QuantizeFn
    stats: StatsDecl = "none"
    block_transform: Optional[BlockTransform] = None

    def stats_for(self, config: MethodConfig) -> StatKind:
        """The statistic the engine collects for this method under `config`."""
        return self.stats(config) if callable(self.stats) else self.stats

    @property
    def needs_calibration(self) -> bool:
        # A config-dependent statistic counts as calibrated (conservative: no config here).
        return callable(self.stats) or self.stats != "none" or self.block_transform is not None


METHODS: dict[str, Method] = {}


def register_method(
    name: str, config: type[MethodConfig], stats: StatsDecl = "none",
    block_transform: Optional[BlockTransform] = None,
) -> Callable[[QuantizeFn], QuantizeFn]:
    """Decorator: register ``fn`` as method ``name``; its config must say ``method: Literal[name]``."""
    if config.model_fields["method"].annotation != Literal[name]:
        raise TypeError(f"{config.__name__}.method must be Literal['{name}']")

    def wrap(fn: QuantizeFn) -> QuantizeFn:
        METHODS[name] = Method(name, config, fn, stats, block_transform)
        return fn

    return wrap


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown quantization method '{name}'; valid: {', '.join(sorted(METHODS))}") from None
