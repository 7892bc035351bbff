"""Is the original model's perplexity believable? A run whose reference is broken (wrong
tokenizer, missing BOS, bad conversion) makes every candidate's figures noise, and candidates
then look *better* than the original. Two bounds any working language model beats:

- the uniform distribution over the vocabulary: perplexity = vocab_size;
- the unigram model of the evaluation text itself (each token's frequency in the scored
  targets): perplexity = exp(entropy of those frequencies). It is fitted on the very text it is
  scored on, so it is optimistic, yet a model that reads the text with the tokenizer it was
  trained with beats it by an order of magnitude (Gemma 3 270M: 22.5 against 672 on 40 x 512
  Wikipedia windows with BOS; the broken run of issue 13 scored 57,088).

Above the lower of the two, the run is flagged: it still writes what it measured, with the
warning in the table, results.json, the HTML report and the model card; publishing it needs
`--force`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch


def unigram_perplexity(eval_ids: "torch.Tensor") -> float:
    """exp(entropy) of the frequencies of the scored targets (every token but each window's first)."""
    import torch

    targets = eval_ids[:, 1:].reshape(-1)
    counts = torch.bincount(targets).double()
    p = counts[counts > 0] / targets.numel()
    return math.exp(float(-(p * p.log()).sum()))


def check_original(perplexity: float, eval_ids: "torch.Tensor", vocab_size: int) -> dict:
    """The sanity record written with the results: `flagged` and, when flagged, `message`."""
    unigram = unigram_perplexity(eval_ids)
    bound = min(float(vocab_size), unigram)
    flagged = not math.isfinite(perplexity) or perplexity > bound
    record = {
        "flagged": flagged, "original_perplexity": perplexity, "unigram_perplexity": unigram,
        "vocab_size": vocab_size, "bound": bound,
    }
    if flagged:
        record["message"] = warning_line(record)
    return record


def warning_line(record: dict) -> str:
    what = ("a unigram model of the evaluation text itself" if record["unigram_perplexity"] <= record["vocab_size"]
            else f"uniform guessing over the {record['vocab_size']:,} tokens of the vocabulary")
    return (
        f"WARNING: the original model's perplexity {record['original_perplexity']:,.1f} is worse than "
        f"{what} ({record['bound']:,.1f}): the original is not read correctly (tokenizer, BOS, "
        "conversion?), so no figure of this run can be trusted"
    )


def flagged_message(sanity: Optional[dict]) -> Optional[str]:
    """The warning of a flagged record, None otherwise (and for runs made before the check)."""
    if isinstance(sanity, dict) and sanity.get("flagged"):
        return sanity.get("message") or warning_line(sanity)
    return None
