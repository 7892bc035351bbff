"""The comparison plots as PNG bytes (matplotlib with the Agg backend; the `report` extra).

Imported only by the report code, so a run without matplotlib still writes everything else.
"""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from compress.serving import GIB  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def tradeoff(comp: dict) -> bytes:
    """Perplexity and KL against MB on disk; the Pareto front is joined and ringed."""
    rows = [r for r in comp["rows"] if not r.get("error") and r.get("bytes")]
    panels = [("perplexity", "perplexity"), ("kl_divergence", "KL(original || candidate)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, label) in zip(axes, panels):
        pts = [r for r in rows if r.get(key) is not None]
        front = set(comp["pareto"].get(key, []))
        for r in pts:
            on = r["name"] in front
            ax.scatter(r["bytes"] / 1e6, r[key], s=60 if on else 30, zorder=3,
                       color="tab:red" if on else "tab:blue", edgecolors="black" if on else "none")
            ax.annotate(r["name"], (r["bytes"] / 1e6, r[key]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        fr = sorted((r for r in pts if r["name"] in front), key=lambda r: r["bytes"])
        if fr:
            ax.plot([r["bytes"] / 1e6 for r in fr], [r[key] for r in fr], "--", color="tab:red",
                    label="Pareto front", zorder=2)
            ax.legend(fontsize=8)
        if key == "kl_divergence" and any(r[key] > 0 for r in pts):
            ax.set_yscale("symlog", linthresh=min(r[key] for r in pts if r[key] > 0))
        ax.set_xlabel("MB on disk")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    failed = [r["name"] for r in comp["rows"] if r.get("error")]
    if failed:
        fig.suptitle(f"failed (not plotted): {', '.join(failed)}", fontsize=9, color="tab:red")
    return _png(fig)


def layer_errors(comp: dict) -> bytes:
    """Per-layer relative weight error and, where calibration data existed, output error."""
    layers = {n: ls for n, ls in comp["layers"].items() if ls}
    has_out = any(l.get("output_rel_error") is not None for ls in layers.values() for l in ls)
    keys = ["weight_rel_error"] + (["output_rel_error"] if has_out else [])
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 3.4 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for name, ls in layers.items():
            ys = [l.get(key) for l in ls]
            if any(y is not None for y in ys):
                ax.plot(range(len(ls)), [y if y is not None else float("nan") for y in ys],
                        marker=".", linewidth=1, label=name)
        ax.set_yscale("log")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("quantized linear layer (model order)")
    if not layers:
        axes[0, 0].text(0.5, 0.5, "no candidate completed", ha="center", transform=axes[0, 0].transAxes)
    return _png(fig)


def memory(comp: dict) -> bytes:
    """Stacked serving memory per row (weights, KV cache, overhead) against the GPU sizes."""
    s = comp["serving"]
    rows = [r for r in comp["rows"] if r.get("serving_bytes") is not None]
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(rows) + 1.6))
    names = [r["name"] for r in rows]
    left = [0.0] * len(rows)
    for key, label, color in (("weights_bytes", "weights", "tab:blue"), ("kv_cache_bytes", "KV cache", "tab:orange"),
                              ("overhead_bytes", "overhead", "tab:gray")):
        w = [r[key] / GIB for r in rows]
        ax.barh(names, w, left=left, label=label, color=color)
        left = [a + b for a, b in zip(left, w)]
    top = max(left, default=0)
    shown = [g for g in s["gpus"] if g["memory_gb"] <= max(top, 0) * 1.5 or g is s["gpus"][0]]
    for g in shown:
        ax.axvline(g["memory_gb"], color="tab:green", linestyle=":")
        ax.text(g["memory_gb"], len(rows) - 0.5, f"{g['memory_gb']:g} GB", fontsize=7, color="tab:green")
    ax.invert_yaxis()
    ax.set_xlabel(f"GiB to serve: context {s['context_length']} x batch {s['batch']}, KV {s['kv_dtype']}")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def mixed_bits(allocations: dict[str, dict]) -> bytes:
    """Per mixed candidate, the bits chosen per block (rows) and module (columns), each cell
    labelled `bits/group` (`ch` per channel, `a` asymmetric) or `fp` (left in float)."""
    from compress.report.mixed import option_text

    fig, axes = plt.subplots(1, len(allocations), figsize=(4.2 * len(allocations), 0.5), squeeze=False)
    height = 1.0
    for ax, (name, a) in zip(axes[0], allocations.items()):
        grid: dict[str, dict[str, dict]] = {}
        modules: list[str] = []
        for layer in a["layers"]:
            block, _, module = layer["name"][len(a["block_prefix"]):].partition(".")
            grid.setdefault(block, {})[module] = layer
            if module not in modules:
                modules.append(module)
        blocks = list(grid)
        # float drawn as 10: past 8 bits, without squeezing 2-8 into a corner of the colour map
        bits = [[(grid[b].get(m) or {}).get("bits") or 10 for m in modules] for b in blocks]
        ax.imshow(bits, cmap="viridis", vmin=2, vmax=10, aspect="auto")
        for y, b in enumerate(blocks):
            for x, m in enumerate(modules):
                layer = grid[b].get(m)
                if layer:
                    text = "fp" if layer["bits"] is None else option_text(layer)
                    ax.text(x, y, text, ha="center", va="center", fontsize=6,
                            color="black" if (layer["bits"] or 10) >= 8 else "white")
        ax.set_xticks(range(len(modules)), [m.rsplit(".", 1)[-1] for m in modules], rotation=45, fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks, fontsize=6)
        ax.set_ylabel("block")
        target = ", ".join(f"{k}={v}" for k, v in a["target"].items())
        ax.set_title(f"{name}\n{target}: {a['achieved_bytes'] / 1e6:.2f} MB", fontsize=8)
        height = max(height, 0.22 * len(blocks) + 1.5)
    fig.set_figheight(height)
    return _png(fig)


def render_all(comp: dict) -> dict[str, bytes]:
    out = {"tradeoff": tradeoff(comp), "layer_errors": layer_errors(comp), "memory": memory(comp)}
    if comp.get("allocations"):
        out["mixed_bits"] = mixed_bits(comp["allocations"])
    return out
