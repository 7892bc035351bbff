"""Generation over any `Decoder` (compress.runtime.registry): sampling and streamed text.

Sampling follows llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95; temperature 0 is
greedy) with a fixed seed, so the same command prints the same text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 40  # 0: no top-k cut
    top_p: float = 0.95  # 1.0: no nucleus cut
    seed: int = 0


def next_token(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """The next token from `logits` [vocab]: argmax at temperature 0, else a draw from the
    softmax of logits / temperature restricted to the top-k, then to the smallest set of most
    likely tokens whose probability reaches top-p."""
    if s.temperature <= 0:
        return int(logits.argmax())
    z = logits.double() / s.temperature
    if 0 < s.top_k < z.numel():
        z = z.masked_fill(z < z.topk(s.top_k).values[-1], -torch.inf)
    p = torch.softmax(z, -1)
    if s.top_p < 1.0:
        sp, order = p.sort(descending=True)
        before = sp.cumsum(0) - sp  # mass of the tokens ranked above each one
        sp = sp.masked_fill(before >= s.top_p, 0.0)  # the first token always stays
        p = torch.zeros_like(p).scatter_(0, order, sp)
    return int(torch.multinomial(p, 1, generator=gen))


@dataclass
class Timing:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped_at_eos: bool = False
    _t: float = field(default=0.0, repr=False)


def generate(decoder, prompt_ids: list[int], max_new: int, sampling: Sampling, stop_ids: set[int],
             timing: Timing | None = None) -> Iterator[int]:
    """Yield up to `max_new` new token ids after `prompt_ids`, stopping before a stop id."""
    timing = timing if timing is not None else Timing()
    gen = torch.Generator().manual_seed(sampling.seed)
    t0 = time.perf_counter()
    logits = decoder.prefill(torch.tensor([prompt_ids], dtype=torch.long))
    t1 = time.perf_counter()
    timing.prompt_tokens, timing.prefill_s = len(prompt_ids), t1 - t0
    for i in range(max_new):
        tok = next_token(logits, sampling, gen)
        if tok in stop_ids:
            timing.stopped_at_eos = True
            break
        timing.new_tokens += 1
        yield tok
        if i + 1 < max_new:
            logits = decoder.step(tok)
    timing.decode_s = time.perf_counter() - t1


class TextStream:
    """Token ids in, new text out: decodes the whole continuation each time and returns what it
    adds, holding back an incomplete UTF-8 character (a byte-level token may split one)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.done = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.done = text[self.done:], len(text)
        return new


def stop_ids(tokenizer, folder) -> set[int]:
    """EOS of the tokenizer and of the folder's generation_config.json (chat models end a turn
    with a token of their own there)."""
    import json
    from pathlib import Path

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gc = Path(folder) / "generation_config.json"
    if gc.is_file():
        eos = json.loads(gc.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def prompt_ids(tokenizer, prompt: str, chat: bool, where: str) -> list[int]:
    """The prompt's ids: through the tokenizer's chat template as one user turn with the
    assistant's turn opened (`chat`), else as plain text (BOS added where the tokenizer does)."""
    from compress.models.checkpoint import CheckpointError

    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"--chat: the tokenizer of {where} has no chat template; drop --chat")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    if hasattr(ids, "keys"):  # a BatchEncoding in recent transformers
        ids = ids["input_ids"]
    return list(ids)
