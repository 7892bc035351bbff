"""The report's section on mixed-precision candidates (a `quantize.target`): budget, bytes,
the GPUs it fits, predicted loss beside measured KL, and the bits chosen per block and module."""
from __future__ import annotations


def _gguf_type(layer: dict) -> bool:
    t = layer.get("type")
    return t is not None and t != "float" and "/" not in t  # a GGUF type (Q4_K, Q5_0): `option_label`


def option_text(layer: dict) -> str:
    if layer["bits"] is None:
        return "float"
    if _gguf_type(layer):
        return layer["type"]
    gs = "ch" if layer["group_size"] == -1 else f"g{layer['group_size']}"
    return f"{layer['bits']}/{gs}" + ("" if layer["sym"] else "a")


def bits_table(layers: list[dict], block_prefix: str) -> str:
    """Blocks as rows, modules as columns: `4/g64` (bits / group, `ch` per channel, `a`
    asymmetric) or `float`."""
    grid: dict[str, dict[str, str]] = {}
    modules: list[str] = []
    for layer in layers:
        block, _, module = layer["name"][len(block_prefix):].partition(".")
        grid.setdefault(block, {})[module] = option_text(layer)
        if module not in modules:
            modules.append(module)
    lines = ["| block | " + " | ".join(m.rsplit(".", 1)[-1] for m in modules) + " |",
             "|" + "---|" * (len(modules) + 1)]
    for block, cells in grid.items():
        lines.append(f"| {block} | " + " | ".join(cells.get(m, "-") for m in modules) + " |")
    return "\n".join(lines)


def bits_mix(layers: list[dict]) -> str:
    if any(_gguf_type(layer) for layer in layers):  # GGUF types: Q5_0 and Q5_K are both 5-bit
        types = [option_text(layer) for layer in layers]
        return ", ".join(f"{types.count(t)} x {t}" for t in sorted(set(types), key=lambda t: (t == "float", t)))
    bits = [layer["bits"] for layer in layers]
    return ", ".join(f"{bits.count(b)} x {'float' if b is None else f'{b}-bit'}"
                     for b in sorted(set(bits), key=lambda b: 99 if b is None else b))


def section(rows: list[dict], allocations: dict[str, dict]) -> str:
    """Markdown for every candidate that has an allocation ('' when none has)."""
    if not allocations:
        return ""
    by_name = {r["name"]: r for r in rows}

    def num(v, f="{:,}"):
        return "-" if v is None else f.format(v)

    out = ["", "## Mixed precision", "",
           "Predicted loss: the summed predicted loss of the chosen options, by each candidate's "
           "`quantize.target_options.predictor` (block_kl and fisher in units of KL; the output-error "
           "predictors on their own scale); measured KL: the evaluation's mean KL(original || candidate). "
           "`benchmarks/mixed_precision.py` measures how well one orders the other.", "",
           "| candidate | target | budget bytes | achieved bytes | bytes on disk | fits on | predicted loss | measured KL |",
           "|---|---|---|---|---|---|---|---|"]
    for name, a in allocations.items():
        r = by_name.get(name, {})
        target = ", ".join(f"{k}={v}" for k, v in a["target"].items())
        fits = r.get("fits_on") or []
        out.append(f"| {name} | {target} | {a['budget_bytes']:,} ({a['counts']}) | {a['achieved_bytes']:,} | "
                   f"{num(r.get('bytes'))} | {fits[0] if fits else '-'} | {a['predicted_loss']:.4g} | "
                   f"{num(r.get('kl_divergence'), '{:.4f}')} |")
    for name, a in allocations.items():
        out += ["", f"### {name}: bits per layer ({bits_mix(a['layers'])})", "",
                bits_table(a["layers"], a["block_prefix"])]
        if a.get("against_recipe"):  # the format's own recipe (a k-quant mix) measured beside it
            c = a["against_recipe"]
            out += ["", f"Against the plan's own types (the format's recipe, {c['recipe']['bytes']:,} bytes): "
                        f"whole-model KL with every linear rounded to nearest, {c['allocation']['joint_rtn_kl']:.4g} "
                        f"for the allocation, {c['recipe']['joint_rtn_kl']:.4g} for the recipe; the "
                        f"{c['kept']} is written."]
        if a.get("outer"):  # the embedding and head were options of the budget
            o = a["outer"]
            parts = [f"{k} {_outer_text(v)}"
                     for k, v in (("embedding", o["embedding"]), ("lm_head", o["lm_head"])) if v]
            if o.get("shared"):  # one table: the embedding reads the quantized head's rows
                parts = [f"one table, the embedding reading the lm_head's {option_text(o['lm_head'])} rows"]
            out += ["", f"Outside the blocks: {', '.join(parts)} ({o['bytes']:,} bytes with the other outer "
                        f"tensors; predicted loss {o['predicted_loss']:.4g}, the KL measured with each alone rounded)."]
    return "\n".join(out) + "\n"


def _outer_text(entry: dict) -> str:
    """An embedding / head entry of the allocation: its option, or what the format stores it as."""
    if entry["bits"] is not None:
        return option_text(entry)
    if entry.get("format_type"):  # left float by the allocation, rounded by the format itself
        return f"{entry['format_type']} (the format's own rounding)"
    return "float"
