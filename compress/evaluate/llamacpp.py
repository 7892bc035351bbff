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

    python -m compress.evaluate.llamacpp A.gguf --prompt 128 --new 32 --passes 3   # speed of one file
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


def open_llama(path: Path, n_ctx: int, threads: int, logits_all: bool, mmap: bool = True):
    """A llama.cpp context on `path` with one batch of `n_ctx` tokens, CPU; ``mmap=False`` reads
    the weights into the process's memory instead of mapping the file."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=0, use_mmap=mmap, verbose=False)


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


def _one_pass(llm, ids: list[int], new: int) -> tuple[float, float, float]:
    """One timed sequence from an empty cache: prefill tokens/s, then greedy-decode tokens/s by
    the wall clock and by the process's CPU time (which a job preempting this one does not add to)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1, c1 = time.perf_counter(), time.process_time()
    nxt = _last_argmax(llm)
    for _ in range(new):
        llm.eval([nxt])
        nxt = _last_argmax(llm)
    t2, c2 = time.perf_counter(), time.process_time()
    return len(ids) / (t1 - t0), new / (t2 - t1), new / (c2 - c1)


def speed_passes(path: Path, prompt: int, new: int, threads: int, passes: int,
                 warmup: int = 1, mmap: bool = False) -> dict[str, list[float]]:
    """Prefill and greedy-decode tokens/s of one GGUF file in llama.cpp, pass by pass.

    A pass is the prompt of `prompt` random ids (the ids our torch speed measure uses,
    `compress.evaluate.speed`) from an empty cache, then `new` greedy tokens; its prefill also
    brings the weights back into cache before the decode is timed. `warmup` untimed passes come
    first. The weights are read into memory (``mmap=False``), so the page cache's state of the
    file stays out of the figure. Returns the per-pass lists ``prefill``, ``decode`` (wall
    clock) and ``decode_cpu`` (CPU time). To compare files, time each in its own process
    (`alternating_passes`), not several in one."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    llm = open_llama(path, prompt + new + 8, threads, logits_all=False, mmap=mmap)
    try:
        ids = torch.randint(0, llm.n_vocab(), (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
        for _ in range(warmup):
            _one_pass(llm, ids, new)
        out = {"prefill": [], "decode": [], "decode_cpu": []}
        for _ in range(passes):
            for key, x in zip(out, _one_pass(llm, ids, new)):
                out[key].append(x)
        return out
    finally:
        llm.close()


def alternating_passes(paths: Sequence[Path], prompt: int, new: int, threads: Optional[int] = None,
                       passes: int = 15, warmup: int = 1, mmap: bool = False) -> list[dict[str, list[float]]]:
    """Per file, `passes` timed passes for comparing files: every pass in a fresh child process
    (`passes_in_subprocess`: open, `warmup` untimed passes, one timed pass; the load is not
    timed), round k one pass of every file, in the given order on even rounds and reversed on
    odd ones (A B, B A, A B, ...), so a drift of the machine falls on the files alike and pass k
    of two files, taken seconds apart, compare as a pair (`paired_ratio`).

    Why a process per pass: a context keeps its decode speed for its life (passes of one
    process agree to ~1%, processes on the same file differ by up to ~8%; where the weights land
    in memory is the likely cause), so with every file open in one process a byte copy of a file
    decoded 3-10% slower than the file in every run, the offset following the open order
    (benchmarks/results/gguf-vs-llama-quantize-2026-12-07-decode.md). A fresh process per pass
    draws that offset anew each time: it becomes noise that the median over passes averages
    out. Returns, per file, the lists of `speed_passes`."""
    out = [{"prefill": [], "decode": [], "decode_cpu": []} for _ in paths]
    for k in range(passes):
        order = range(len(paths)) if k % 2 == 0 else reversed(range(len(paths)))
        for i in order:
            got = passes_in_subprocess(paths[i], prompt, new, threads, 1, warmup, mmap)
            for key in out[i]:
                out[i][key] += got[key]
    return out


def spread(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method) and range of a list of per-pass figures."""
    import statistics

    xs = sorted(xs)
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"median": med, "q1": q1, "q3": q3, "min": xs[0], "max": xs[-1]}


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """`spread` of a[k] / b[k] over the passes of two files of one `alternating_passes` call."""
    if len(a) != len(b):
        raise ValueError(f"unpaired passes: {len(a)} and {len(b)}")
    return spread([x / y for x, y in zip(a, b)])


def main(argv: list[str] | None = None) -> None:
    """Prints ``{"path", "prefill", "decode", "decode_cpu", "serving_peak_rss_mb"}`` of one file."""
    from compress.evaluate.memory import PeakMemory

    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path, help="a GGUF file")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mmap", action="store_true", help="map the file instead of reading it in")
    a = ap.parse_args(argv)
    with PeakMemory() as mem:
        per = speed_passes(a.path, a.prompt, a.new, a.threads or default_threads(), a.passes, a.warmup, a.mmap)
    print(json.dumps({"path": str(a.path), **per, "serving_peak_rss_mb": mem.peak / 2**20}))


def passes_in_subprocess(path: Path, prompt: int, new: int, threads: Optional[int] = None,
                         passes: int = 3, warmup: int = 1, mmap: bool = False) -> dict:
    """`speed_passes` of one file in a child process (its memory, the serving footprint, stays
    apart): `main`'s JSON."""
    from compress.children import run_child

    cmd = [sys.executable, "-m", "compress.evaluate.llamacpp", str(path), "--prompt", str(prompt),
           "--new", str(new), "--threads", str(threads or default_threads()), "--passes", str(passes),
           "--warmup", str(warmup), *(["--mmap"] if mmap else [])]
    proc = run_child(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp speed measurement failed for {path}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed_in_subprocess(path: Path, prompt: int, new: int, threads: Optional[int] = None, passes: int = 3) -> dict:
    """One file's median prefill and decode tokens/s over `passes` (the pipeline's speed
    columns) and the peak RSS of the process that served it."""
    f = passes_in_subprocess(path, prompt, new, threads, passes)
    return {"prefill_tokens_per_s": spread(f["prefill"])["median"],
            "decode_tokens_per_s": spread(f["decode"])["median"],
            "serving_peak_rss_mb": f["serving_peak_rss_mb"]}


if __name__ == "__main__":
    from compress.children import die_with_parent

    die_with_parent()
    main()
