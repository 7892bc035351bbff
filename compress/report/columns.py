"""The one column model: every table compress prints or writes (the run's report and terminal
table, the comparison files, the model card) picks its columns from here, so a metric has one
header, one unit and one format everywhere."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from compress.serving import GIB


@dataclass(frozen=True)
class Column:
    key: str  # key of a results row
    header: str
    fmt: str = "{}"
    scale: float = 1.0  # the row's value is divided by this before formatting (bytes -> MB)
    card_header: Optional[str] = None  # header in the model card (longer, for readers)

    def text(self, value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, (list, tuple)):  # an interval
            return "[" + ", ".join(self.text(v) for v in value) + "]"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self.fmt.format(value / self.scale if self.scale != 1 else value)
        return str(value)


_ALL = (
    Column("name", "candidate"),
    Column("pareto", "pareto"),
    Column("runtime", "runtime", card_header="Runtime"),
    Column("perplexity", "ppl", "{:.3f}", card_header="Perplexity"),
    Column("perplexity_ci95", "ppl 95% CI", "{:.2f}", card_header="Perplexity 95% CI"),
    Column("ppl_increase", "ppl +%", "{:+.2%}"),
    # PPL(candidate) / PPL(original), paired by window: what says a candidate is really worse
    Column("ppl_ratio_ci95", "ppl ratio 95% CI", "{:.4f}", card_header="PPL ratio 95% CI"),
    Column("kl_divergence", "KL", "{:.4f}", card_header="KL div."),
    Column("kl_divergence_se", "KL se", "{:.4f}", card_header="KL std. err."),
    Column("kl_median", "KL p50", "{:.4f}", card_header="KL median"),
    Column("kl_p99", "KL p99", "{:.3f}", card_header="KL 99%"),
    Column("kl_p999", "KL p99.9", "{:.3f}", card_header="KL 99.9%"),
    Column("top1_agreement", "top-1", "{:.3f}", card_header="Top-1 agree"),
    Column("top1_agreement_se", "top-1 se", "{:.3f}", card_header="Top-1 std. err."),
    Column("bytes", "MB on disk", "{:.1f}", 1e6, card_header="Size (MB)"),
    Column("bits_per_weight", "bits/w (file)", "{:.2f}", card_header="Bits/weight"),
    Column("linear_bits_per_weight", "bits/w (linears)", "{:.2f}"),
    Column("serving_bytes", "serve GiB", "{:.3f}", GIB),
    Column("smallest_gpu", "fits on"),
    Column("prefill_tokens_per_s", "prefill tok/s", "{:.0f}", card_header="Prefill tok/s"),
    Column("decode_tokens_per_s", "decode tok/s", "{:.1f}", card_header="Decode tok/s"),
    Column("serving_peak_rss_mb", "serve RSS MB", "{:.0f}", card_header="Peak RSS (MB)"),
    Column("speed_runtime", "speed runtime", card_header="Speed measured with"),
    Column("quantize_seconds", "quantize s", "{:.1f}"),
    Column("node", "node"),
    Column("status", "status"),
)
COLUMNS: dict[str, Column] = {c.key: c for c in _ALL}

RUN_TABLE = ("name", "runtime", "perplexity", "perplexity_ci95", "ppl_ratio_ci95", "kl_divergence", "kl_divergence_se",
             "kl_median", "kl_p99", "kl_p999", "top1_agreement", "top1_agreement_se", "bytes", "bits_per_weight",
             "linear_bits_per_weight", "prefill_tokens_per_s", "decode_tokens_per_s", "serving_peak_rss_mb",
             "speed_runtime", "quantize_seconds", "status")
COMPARISON_TABLE = ("name", "pareto", "runtime", "perplexity", "ppl_increase", "ppl_ratio_ci95", "kl_divergence",
                    "kl_divergence_se", "kl_p99", "top1_agreement", "bytes",
                    "bits_per_weight", "serving_bytes", "smallest_gpu", "decode_tokens_per_s",
                    "speed_runtime", "quantize_seconds", "node", "status")
CARD_TABLE = tuple(c.key for c in _ALL if c.card_header)


def cell(row: dict, key: str) -> str:
    """A row's value in column `key`, as table text (status and Pareto marks spelt out)."""
    if key == "status":
        err = row.get("error")
        return (err if str(err).startswith("FAILED") else f"FAILED: {err}") if err else "ok"
    if key == "pareto":
        return "*" if row.get("pareto") else ""
    return COLUMNS[key].text(row.get(key))


def markdown_table(rows: Sequence[dict], keys: Sequence[str], *, card: bool = False,
                   escape: Callable[[str], str] = lambda s: s.replace("|", "\\|")) -> str:
    """A Markdown table of `rows` in columns `keys` (card headers with `card`)."""
    cols = [COLUMNS[k] for k in keys]
    head = "| " + " | ".join((c.card_header or c.header) if card else c.header for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(escape(cell(r, k)) for k in keys) + " |" for r in rows]
    return "\n".join([head, sep, *body])
