"""Stage: evaluate the original and every candidate artifact in one lockstep block walk.

All models stream the same evaluation windows block by block; at the end each window's
original logits are computed once and compared with every candidate's, so KL divergence
needs no stored logits and the original is evaluated once per run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from compress.config import EvaluateConfig
from compress.engine import StreamedModel
from compress.evaluate.divergence import DivergenceMeter, NLLMeter
from compress.progress import progress

log = logging.getLogger(__name__)


@dataclass
class EvalRow:
    name: str
    perplexity: float
    kl_divergence: Optional[float] = None
    top1_agreement: Optional[float] = None
    extra: dict = field(default_factory=dict)


def evaluate_streams(
    original: StreamedModel, candidates: dict[str, StreamedModel], eval_ids: torch.Tensor,
    cfg: EvaluateConfig,
) -> dict[str, EvalRow]:
    models = {"original": original, **candidates}
    hidden = {name: sm.embed(eval_ids) for name, sm in models.items()}
    for i in progress(range(original.n_blocks), desc="evaluate", unit="block"):
        for name, sm in models.items():
            block = sm.load_block(i)
            hidden[name] = sm.run_block(block, i, hidden[name])
            del block
    nll = {name: NLLMeter() for name in models}
    div = {name: DivergenceMeter() for name in candidates}
    for w in range(eval_ids.shape[0]):
        ids = eval_ids[w : w + 1]
        ref = original.logits(hidden["original"][w], ids)
        nll["original"].add(ref, ids)
        for name, sm in candidates.items():
            logits = sm.logits(hidden[name][w], ids)
            nll[name].add(logits, ids)
            if cfg.divergence:
                div[name].add(ref, logits)
    rows = {"original": EvalRow("original", nll["original"].perplexity, 0.0, 1.0)}
    for name in candidates:
        d = div[name] if cfg.divergence else None
        rows[name] = EvalRow(name, nll[name].perplexity, d.kl if d else None, d.top1 if d else None)
    return rows


def dir_bytes(path: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.bin")) -> int:
    return sum(p.stat().st_size for pat in patterns for p in Path(path).glob(pat))
