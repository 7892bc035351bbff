"""Stage: evaluate the original and every candidate artifact in one lockstep block walk.

The original is streamed once over the evaluation windows and its final hidden states are
kept; each candidate is then streamed and its logits compared with the original's, recomputed
from those hidden states slice by slice, so KL divergence never needs stored logits.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from compress.config import EvaluateConfig
from compress.engine import StreamedModel
from compress.evaluate.divergence import DivergenceMeter, NLLMeter
from compress.evaluate.memory import release_freed, trim_heap
from compress.progress import progress

log = logging.getLogger(__name__)


@dataclass
class EvalRow:
    name: str
    perplexity: float
    kl_divergence: Optional[float] = None
    top1_agreement: Optional[float] = None
    extra: dict = field(default_factory=dict)


def _final_hidden(sm: StreamedModel, eval_ids: torch.Tensor, desc: str) -> list[torch.Tensor]:
    hidden = sm.embed(eval_ids)
    for i in progress(range(sm.n_blocks), desc=f"evaluate {desc}", unit="block"):
        block = sm.load_block(i)
        hidden = sm.run_block(block, i, hidden, in_place=True)
        del block
        trim_heap()  # the block's freed temporaries, so they do not sit under the next block
    return hidden


def _logit_chunks(sm: StreamedModel, hidden: torch.Tensor, ids: torch.Tensor, chunk: int):
    """Logits of one window in slices of positions: only `chunk` x vocab floats at a time.

    The last block's output is final; the head (final norm, lm_head, soft-capping) acts per
    position, so slicing positions gives the same logits as the whole window.
    """
    for s in range(0, ids.shape[1], chunk):
        yield s, sm.logits(hidden[:, s : s + chunk], ids[:, s : s + chunk])


def evaluate_streams(
    original: StreamedModel, candidates: dict[str, Callable[[], StreamedModel]],
    eval_ids: torch.Tensor, cfg: EvaluateConfig, chunk: int = 32,
) -> dict[str, EvalRow]:
    """The original's final hidden states are kept (small); candidates are then opened and
    streamed one at a time, so memory holds at most two models' embeddings and heads."""
    ref_hidden = _final_hidden(original, eval_ids, "original")
    ref_nll = NLLMeter()
    for w in range(eval_ids.shape[0]):
        ids = eval_ids[w : w + 1]
        for s, logits in _logit_chunks(original, ref_hidden[w], ids, chunk):
            ref_nll.add_slice(logits, ids, s)
    rows = {"original": EvalRow("original", ref_nll.perplexity, 0.0, 1.0)}
    for name, open_model in candidates.items():
        sm = open_model()
        hidden = _final_hidden(sm, eval_ids, name)
        nll, div = NLLMeter(), DivergenceMeter()
        for w in range(eval_ids.shape[0]):
            ids = eval_ids[w : w + 1]
            refs = _logit_chunks(original, ref_hidden[w], ids, chunk)
            for (s, logits), (_, ref) in zip(_logit_chunks(sm, hidden[w], ids, chunk), refs):
                nll.add_slice(logits, ids, s)
                if cfg.divergence:
                    div.add(ref, logits)
        rows[name] = EvalRow(
            name, nll.perplexity, div.kl if cfg.divergence else None, div.top1 if cfg.divergence else None
        )
        del sm, hidden
        release_freed()
    return rows


def dir_bytes(path: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.bin")) -> int:
    return sum(p.stat().st_size for pat in patterns for p in Path(path).glob(pat))
