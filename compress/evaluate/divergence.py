"""Quality metrics from logits: perplexity, KL divergence from the original, top-1 agreement.

Accumulators take one window at a time, and work through it in chunks of positions, so
evaluation never holds more than a couple of vocabulary-sized rows per position in flight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK = 64  # positions per log-softmax: 64 x a 50k vocabulary is ~13 MB in float32


@dataclass
class NLLMeter:
    """Perplexity = exp(mean next-token NLL) over every predicted token of every window."""

    nll_sum: float = 0.0
    tokens: int = 0

    def add_slice(self, logits: torch.Tensor, input_ids: torch.Tensor, start: int) -> None:
        """Logits ``[1, n, V]`` for positions ``start..start+n`` of the window ``input_ids``.

        Position p predicts token p+1; the window's last position has no target.
        """
        n = min(logits.shape[1], input_ids.shape[1] - 1 - start)
        if n <= 0:
            return
        target = input_ids[0, start + 1 : start + 1 + n].to(logits.device)
        for s in range(0, n, CHUNK):
            e = min(s + CHUNK, n)
            lp = F.log_softmax(logits[0, s:e].float(), dim=-1)
            self.nll_sum += float(-lp.gather(1, target[s:e, None]).sum())
        self.tokens += n

    def add(self, logits: torch.Tensor, input_ids: torch.Tensor) -> None:
        self.add_slice(logits, input_ids, 0)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")


@dataclass
class DivergenceMeter:
    """Mean per-token KL(P_original || P_candidate) and top-1 agreement with the original."""

    kl_sum: float = 0.0
    agree: int = 0
    tokens: int = 0

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor) -> None:
        n = ref_logits.shape[1]
        for s in range(0, n, CHUNK):
            ref = F.log_softmax(ref_logits[0, s : s + CHUNK].float(), dim=-1)
            cand = F.log_softmax(logits[0, s : s + CHUNK].float().to(ref.device), dim=-1)
            self.kl_sum += float(F.kl_div(cand, ref, log_target=True, reduction="sum"))
            self.agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        self.tokens += n

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens if self.tokens else float("nan")

    @property
    def top1(self) -> float:
        return self.agree / self.tokens if self.tokens else float("nan")
