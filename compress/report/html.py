"""A self-contained report.html: inline CSS and JS, plots as base64 PNG; opens offline."""
from __future__ import annotations

import base64
import html
import json

from compress.evaluate.sanity import flagged_message
from compress.report.columns import COLUMNS, COMPARISON_TABLE, cell

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;cursor:pointer;user-select:none} th:hover{background:#e0e0ff}
td:first-child,th:first-child{text-align:left}
tr.pareto td{background:#fff4e0} tr.failed td{background:#fde8e8;color:#900}
tr.recommended td:first-child{font-weight:bold}
td.err{text-align:left;white-space:normal;max-width:420px}
.rec{padding:8px 12px;background:#eef7ee;border-left:4px solid #3a3;margin:12px 0}
.warn{padding:8px 12px;background:#fdecea;border-left:4px solid #c33;margin:12px 0;font-weight:bold}
img{max-width:100%;border:1px solid #ddd;margin:6px 0}
.note{color:#555;font-size:12px}
"""

# Click a header to sort by it; a second click reverses. Numbers sort numerically ("-" last).
_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var tbody = th.closest('table').tBodies[0];
    var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      if (isNaN(nx) && isNaN(ny)) return asc ? (x || '').localeCompare(y || '') : (y || '').localeCompare(x || '');
      if (isNaN(nx)) return 1; if (isNaN(ny)) return -1;
      return asc ? nx - ny : ny - nx;
    });
    rows.forEach(function(r){ tbody.appendChild(r); });
  });
});
"""


def _sort_value(row: dict, key: str) -> str:
    v = row.get(key)
    if key == "pareto":
        return str(len(v or []))
    if key == "status":
        return "failed" if row.get("error") else "ok"
    return "" if v is None else str(v)


def table_html(comp: dict) -> str:
    rec = comp["recommendation"]["name"]
    heads = [COLUMNS[k].header for k in COMPARISON_TABLE]
    head = "".join(f"<th title='sort by {html.escape(h)}'>{html.escape(h)}</th>" for h in heads)
    body = []
    for r in comp["rows"]:
        cls = " ".join(c for c, on in (("pareto", r.get("pareto")), ("failed", r.get("error")),
                                       ("recommended", r["name"] == rec)) if on)
        tds = []
        for k in COMPARISON_TABLE:
            text = cell(r, k)
            if k == "smallest_gpu" and r.get("fits_on"):
                text = f"{text} (+{len(r['fits_on']) - 1} larger)" if len(r["fits_on"]) > 1 else text
            td_cls = " class='err'" if k == "status" and r.get("error") else ""
            tds.append(f"<td{td_cls} data-v='{html.escape(_sort_value(r, k), quote=True)}'>{html.escape(text)}</td>")
        body.append(f"<tr class='{cls}'>{''.join(tds)}</tr>")
    return (f"<table class='sortable' id='comparison'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def render_html(comp: dict, pngs: dict[str, bytes]) -> str:
    s = comp["serving"]
    imgs = {n: f"<img alt='{n}' src='data:image/png;base64,{base64.b64encode(b).decode()}'>" for n, b in pngs.items()}
    missing = "<p class='note'>Plots need matplotlib (pip install 'compress[report]').</p>"
    proto = comp.get("protocol") or {}
    gpus = ", ".join(f"{html.escape(g['name'])}" for g in s["gpus"])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>compress comparison: {html.escape(comp['model'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Quantization trade-off: {html.escape(comp['model'])}</h1>",
        *([f"<div class='warn'>{html.escape(w)}</div>"] if (w := flagged_message(comp.get("sanity"))) else []),
        f"<div class='rec'>{html.escape(comp['recommendation']['line'])}</div>",
        table_html(comp),
        "<p class='note'>Click a column header to sort. Orange rows are Pareto-optimal (no other row is "
        "both smaller on disk and better in perplexity or KL); red rows failed, with their error. "
        f"Evaluation: {html.escape(proto.get('name', 'not run'))}.</p>",
        "<h2>Perplexity and KL vs bytes on disk</h2>", imgs.get("tradeoff", missing),
        f"<h2>Memory to serve (context {s['context_length']}, batch {s['batch']}, KV cache {s['kv_dtype']})</h2>",
        imgs.get("memory", missing),
        f"<p class='note'>weights (tensor bytes of the artifact) + KV cache = {html.escape(s['formula'])} "
        f"= 2 x {s['layers']} x {s['kv_heads']} x {s['head_dim']} x {s['context_length']} x {s['batch']} x bytes "
        f"(grouped-query attention: KV heads, not query heads) + {s['overhead_gb']} GiB runtime overhead. "
        f"GPUs: {gpus}.</p>",
        "<h2>Per-layer quantization error</h2>", imgs.get("layer_errors", missing),
        *(["<h2>Mixed precision: bits chosen per block and module</h2>", imgs["mixed_bits"],
           "<p class='note'>Chosen by quantize.target to minimise the summed predicted loss "
           "(Hessian-weighted output error) under the budget; see comparison.md for predicted loss vs KL.</p>"]
          if "mixed_bits" in imgs else []),
        "<h2>Raw data</h2><details><summary>comparison.json</summary><pre>",
        html.escape(json.dumps({k: v for k, v in comp.items() if k != "layers"}, indent=1, default=str)),
        "</pre></details>",
        f"<script>{_JS}</script></body></html>",
    ]
    return "\n".join(parts)
