"""Quality metrics from logits: perplexity, KL divergence from the original, top-1 agreement.

Accumulators take one window at a time so evaluation never holds all logits at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class NLLMeter:
    """Perplexity = exp(mean next-token NLL) over every predicted token of every window."""

    nll_sum: float = 0.0
    tokens: int = 0

    def add(self, logits: torch.Tensor, input_ids: torch.Tensor) -> None:
        lp = F.log_softmax(logits[0, :-1].float(), dim=-1)
        target = input_ids[0, 1:].to(lp.device)
        self.nll_sum += float(-lp.gather(1, target[:, None]).sum())
        self.tokens += target.numel()

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
        ref = F.log_softmax(ref_logits[0].float(), dim=-1)
        cand = F.log_softmax(logits[0].float().to(ref.device), dim=-1)
        self.kl_sum += float((ref.exp() * (ref - cand)).sum())
        self.agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        self.tokens += ref.shape[0]

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens if self.tokens else float("nan")

    @property
    def top1(self) -> float:
        return self.agree / self.tokens if self.tokens else float("nan")
