"""The run's state as typed values: what each stage reads and what it leaves for the next."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch

from compress.config import RunConfig
from compress.evaluate.memory import PeakMemory
from compress.stages.load import LoadedModel
from compress.stages.quantize import LayerReport, Plan


@dataclass
class Metrics:
    """One row's measurements; None where a stage did not run or does not apply."""

    bytes: Optional[int] = None
    bits_per_weight: Optional[float] = None
    linear_bits_per_weight: Optional[float] = None
    params: Optional[int] = None
    perplexity: Optional[float] = None
    kl_divergence: Optional[float] = None
    top1_agreement: Optional[float] = None
    # Their uncertainty (compress/evaluate/stats.py): over windows, KL percentiles over positions.
    perplexity_ci95: Optional[list[float]] = None
    nll_se: Optional[float] = None
    kl_divergence_se: Optional[float] = None
    kl_median: Optional[float] = None
    kl_p99: Optional[float] = None
    kl_p999: Optional[float] = None
    kl_max: Optional[float] = None
    top1_agreement_se: Optional[float] = None
    ppl_ratio: Optional[float] = None
    ppl_ratio_ci95: Optional[list[float]] = None
    prefill_tokens_per_s: Optional[float] = None
    decode_tokens_per_s: Optional[float] = None
    serving_peak_rss_mb: Optional[float] = None
    speed_runtime: Optional[str] = None  # the runtime/kernels behind the tokens/s (compress/runtime; "onnxruntime")
    runtime: Optional[str] = None  # what ran the evaluation: "torch" (our view) or "llama.cpp"

    def update(self, **values: Any) -> None:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"not a metric: {unknown}")
        for k, v in values.items():
            setattr(self, k, v)

    def as_row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class CalibrationRecord:
    dataset: str
    nsamples: int
    seqlen: int
    seed: int
    chat_template: bool
    windows_sha256: str
    # which documents the windows' offsets range over ("calibration" split, or "all" of them),
    # and how many documents and tokens that is (each document tokenized on its own)
    split: str = "calibration"
    documents: int = 0
    tokens: int = 0
    bos_token_id: Optional[int] = None  # every window starts with it (calibration.bos)


@dataclass(frozen=True)
class Protocol:
    """How the evaluation figures were measured (written with every result)."""

    name: str
    dataset: str
    split: str
    windows: int
    seqlen: int
    windows_sha256: str
    description: str
    bos_token_id: Optional[int] = None  # every window starts with it (evaluate.bos); never a target


@dataclass
class CandidateResult:
    plan: Plan
    artifact: Optional[Path] = None
    layers: list[LayerReport] = field(default_factory=list)
    quantize_seconds: Optional[float] = None
    error: Optional[str] = None
    metrics: Metrics = field(default_factory=Metrics)
    allocation: Optional[dict] = None  # a `quantize.target`'s per-layer choice (stages/allocate.py)
    node: Optional[str] = None  # the host that quantized it (this one, or a Ray worker's)


@dataclass
class RunContext:
    cfg: RunConfig
    out_dir: Path
    plans: list[Plan] = field(default_factory=list)
    resume: bool = False  # continue from the resume store (compress/resume.py)
    loaded: Optional[LoadedModel] = None
    calib_ids: Optional[torch.Tensor] = None
    eval_ids: Optional[torch.Tensor] = None
    eval_bos: Optional[int] = None  # the BOS id the evaluation windows start with
    calibration: Optional[CalibrationRecord] = None
    input_hashes: dict[str, str] = field(default_factory=dict)
    candidates: dict[str, CandidateResult] = field(default_factory=dict)
    original: Metrics = field(default_factory=Metrics)
    protocol: Optional[Protocol] = None
    sanity: Optional[dict] = None  # compress/evaluate/sanity.py: is the original's perplexity believable
    timings: dict[str, float] = field(default_factory=dict)
    stage_peak_mb: dict[str, float] = field(default_factory=dict)
    runtime_rss_mb: Optional[float] = None
    published: object = None
    # layer -> option ("4/64/sym", "float") -> predicted loss, for a run with a quantize.target
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    memory: Optional[PeakMemory] = None
    # how the candidates ran: kind, and for Ray each task's node, resources and bytes moved
    executor: dict = field(default_factory=lambda: {"kind": "local"})


def as_json(value: Any) -> Any:
    """A record (or None) as plain JSON data."""
    return None if value is None else asdict(value)
