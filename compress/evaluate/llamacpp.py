"""llama.cpp as the evaluation runtime of GGUF artifacts, through `llama-cpp-python`.

A GGUF artifact is made for llama.cpp, so its figures should be llama.cpp's: its kernels
(activations quantized to Q8 blocks for the quantized dot products, its own RoPE, softcap and
norms) run our codes. Each evaluation window's token ids are fed as they are (no BOS is added
here: the window carries BOS where the protocol says so) with every position's logits kept, and
scored against the original's logits from our torch view on the same windows:

    KL(P || Q) = sum_i p_i (log p_i - log q_i),  top-1: argmax a == argmax b,

P the original's softmax, Q llama.cpp's. llama-cpp-python is optional (`pip install
'compress[llamacpp]'` compiles llama.cpp): without it a GGUF artifact is evaluated in our torch
view, and the table's `runtime` column says which one measured each row.

    python -m compress.evaluate.llamacpp MODEL.gguf --prompt 128 --new 32 --threads 2   # speed
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from compress.evaluate.vocab_stream import HeadSlices, VocabStats

log = logging.getLogger(__name__)

RUNTIME = "llama.cpp"
TORCH = "torch"
GGUF_NAME = "model.gguf"  # the file the GGUF writer puts in an artifact folder


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether llama-cpp-python imports, its llama.cpp library included (a package installed
    without its library is not usable)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:
        log.warning("llama_cpp is installed but does not load (%s); GGUF artifacts are evaluated in torch", e)
        return False
    return True


def gguf_of(artifact: Path) -> Optional[Path]:
    """The GGUF file of an artifact folder, or None for other formats."""
    p = Path(artifact) / GGUF_NAME
    return p if p.is_file() else None


def default_threads() -> int:
    # The torch view runs on torch's threads; the same count keeps the two runtimes' speeds comparable.
    return max(1, torch.get_num_threads())


def open_llama(path: Path, n_ctx: int, threads: int, logits_all: bool):
    """A llama.cpp context on `path` with one batch of `n_ctx` tokens, CPU, no mmap surprises."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=0, verbose=False)


def window_logits(llm, ids: Sequence[int]) -> torch.Tensor:
    """llama.cpp's logits ``[len(ids), vocab]`` (float32) of one window, from an empty cache."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return torch.from_numpy(llm.scores[: len(ids)].copy())


def ref_window_logits(ref_inputs: torch.Tensor, ref_head: HeadSlices, softcap: Optional[float]) -> torch.Tensor:
    """The original's full logits ``[L, vocab]`` of one window, from its head inputs ``[L, H]``."""
    parts = [torch.nn.functional.linear(ref_inputs, w, b).float() for _, w, b in ref_head()]
    x = torch.cat(parts, dim=1)
    return torch.tanh(x / softcap) * softcap if softcap else x


def window_stats(b: torch.Tensor, ids: torch.Tensor, a: Optional[torch.Tensor] = None,
                 chunk: int = 128) -> VocabStats:
    """Exact statistics of one window from full logits: candidate ``b`` [L, V], targets the next
    ids, and against the original ``a`` [L, V] KL(a || b), top-1 agreement and a's own NLL.
    Float64, `chunk` positions at a time (a 262k vocabulary makes large tiles)."""
    L = ids.shape[0]
    if a is not None and a.shape != b.shape:
        raise ValueError(f"vocabulary mismatch: the original has {a.shape[1]} logits, llama.cpp {b.shape[1]}")
    nxt = torch.full((L,), -1, dtype=torch.long)
    nxt[:-1] = ids[1:]
    st = VocabStats(0.0, L - 1, positions=L)
    if a is not None:
        st.kl_sum, st.agree, st.ref_nll_sum = 0.0, 0, 0.0
    for p0 in range(0, L, chunk):
        sl = slice(p0, min(p0 + chunk, L))
        t = nxt[sl]
        has = t >= 0
        lb = torch.log_softmax(b[sl].double(), dim=-1)
        st.nll_sum -= float(lb[has].gather(1, t[has][:, None]).sum())
        if a is not None:
            la = torch.log_softmax(a[sl].double(), dim=-1)
            st.kl_sum += float((la.exp() * (la - lb)).sum())
            st.agree += int((a[sl].argmax(-1) == b[sl].argmax(-1)).sum())
            st.ref_nll_sum -= float(la[has].gather(1, t[has][:, None]).sum())
    return st


def merge(parts: Iterator[VocabStats]) -> VocabStats:
    total: Optional[VocabStats] = None
    for s in parts:
        if total is None:
            total = s
            continue
        total.nll_sum += s.nll_sum
        total.tokens += s.tokens
        total.positions += s.positions
        if s.kl_sum is not None:
            total.kl_sum += s.kl_sum
            total.agree += s.agree
            total.ref_nll_sum += s.ref_nll_sum
    if total is None:
        raise ValueError("no evaluation windows")
    return total


def evaluate_gguf(
    path: Path, eval_ids: torch.Tensor, ref_inputs: Optional[torch.Tensor] = None,
    ref_head: Optional[HeadSlices] = None, ref_softcap: Optional[float] = None,
    threads: Optional[int] = None,
) -> VocabStats:
    """Perplexity of the GGUF file `path` in llama.cpp on ``eval_ids`` [windows, L]; with the
    original's head inputs ``[windows, L, H]`` and head, also KL, top-1 and its perplexity."""
    w, L = eval_ids.shape
    llm = open_llama(path, L, threads or default_threads(), logits_all=True)
    try:
        def per_window():
            for i in range(w):
                b = window_logits(llm, eval_ids[i].tolist())
                a = None if ref_inputs is None else ref_window_logits(ref_inputs[i], ref_head, ref_softcap)
                yield window_stats(b, eval_ids[i], a)
        return merge(per_window())
    finally:
        llm.close()


def _last_argmax(llm) -> int:
    # Without logits_all, llama-cpp-python keeps no scores: read the last position's row off the context.
    import numpy as np

    return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())


def measure_speed(path: Path, prompt: int, new: int, threads: int, repeats: int = 3) -> dict:
    """Prefill and greedy-decode tokens/s in llama.cpp: the prompt of random ids that our torch
    speed measure uses (`compress.evaluate.speed`), medians of `repeats`."""
    llm = open_llama(path, prompt + new + 8, threads, logits_all=False)
    try:
        vocab = llm.n_vocab()
        ids = torch.randint(0, vocab, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
        llm.reset()
        llm.eval(ids[:8])  # warm-up
        prefill, decode = [], []
        for _ in range(repeats):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            t1 = time.perf_counter()
            nxt = _last_argmax(llm)
            for _ in range(new):
                llm.eval([nxt])
                nxt = _last_argmax(llm)
            t2 = time.perf_counter()
            prefill.append(prompt / (t1 - t0))
            decode.append(new / (t2 - t1))
    finally:
        llm.close()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"prefill_tokens_per_s": med(prefill), "decode_tokens_per_s": med(decode)}


def main(argv: list[str] | None = None) -> None:
    from compress.evaluate.memory import PeakMemory

    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    with PeakMemory() as mem:
        res = measure_speed(a.path, a.prompt, a.new, a.threads or default_threads())
    res["serving_peak_rss_mb"] = mem.peak / 2**20
    print(json.dumps(res))


def speed_in_subprocess(path: Path, prompt: int, new: int, threads: Optional[int] = None) -> dict:
    """`measure_speed` in a child process, so its memory (the serving footprint) stays apart."""
    from compress.children import run_child

    cmd = [sys.executable, "-m", "compress.evaluate.llamacpp", str(path), "--prompt", str(prompt),
           "--new", str(new), "--threads", str(threads or default_threads())]
    proc = run_child(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp speed measurement failed for {path}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    from compress.children import die_with_parent

    die_with_parent()
    main()
