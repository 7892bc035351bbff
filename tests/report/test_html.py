"""report.html and the plots from a hand-made comparison (no model), and an offline screenshot
in headless Chromium when it is installed."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

pytest.importorskip("matplotlib")

from compress.report import comparison  # noqa: E402
from compress.report.html import render_html  # noqa: E402


def _comp() -> dict:
    def row(name, mb, ppl, kl, **kw):
        return {"name": name, "status": "ok", "bytes": int(mb * 1e6), "perplexity": ppl, "kl_divergence": kl,
                "top1_agreement": 1 - kl, "weights_bytes": int(mb * 1e6) - 100, "kv_cache_bytes": 94_371_840,
                "overhead_bytes": 2**30, "serving_bytes": int(mb * 1e6) + 94_371_840 + 2**30,
                "fits_on": ["8 GB", "12 GB"], "smallest_gpu": "8 GB", **kw}

    rows = [row("original", 540, 10.0, 0.0), row("rtn-w8-ch", 160, 10.01, 0.001),
            row("rtn-w4-g64", 110, 10.6, 0.05), row("rtn-w3-g64", 100, 13.0, 0.3),
            row("rtn-w4-ch", 112, 12.0, 0.2),  # dominated by rtn-w4-g64
            {"name": "rtn-w4-g128", "status": "failed", "error": "group size 128 does not divide 576"}]
    fronts = {"perplexity": ["rtn-w3-g64", "rtn-w4-g64", "rtn-w8-ch", "original"]}
    fronts["kl_divergence"] = fronts["perplexity"]
    for r in rows:
        r["pareto"] = [k for k, v in fronts.items() if r["name"] in v]
    layers = {r["name"]: [{"name": f"l{i}", "weight_rel_error": 10 ** -(i % 3 + 2), "output_rel_error": None}
                          for i in range(14)] for r in rows[1:5]}
    layers["rtn-w4-g128"] = []
    return {
        "model": "tiny", "protocol": {"name": "txt-evaluation-4x32"}, "select": {"max_kl": 0.1},
        "recommendation": {"name": "rtn-w4-g64", "line": "select: rtn-w4-g64 (110.0 MB) is the smallest candidate within budget"},
        "pareto": fronts,
        "serving": {"context_length": 4096, "batch": 1, "kv_dtype": "float16", "overhead_gb": 1.0, "layers": 30,
                    "kv_heads": 3, "head_dim": 64, "formula": "2 x layers x ...",
                    "gpus": [{"name": f"{g} GB", "memory_gb": g} for g in (8, 12, 16, 24, 48, 80)]},
        "rows": rows, "layers": layers,
    }


def test_html_is_self_contained_with_table_and_plots(tmp_path):
    paths = comparison.write(_comp(), tmp_path)
    html = paths["html"].read_text()
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", html)  # no external resource
    assert html.count("data:image/png;base64,") == 3
    assert "<script>" in html and "addEventListener('click'" in html
    # one table row per comparison row; the failed one carries its error, Pareto rows their class
    body = html.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr") == 6
    assert "class='failed'" in body and "group size 128 does not divide 576" in body
    assert body.count("pareto") == 4
    assert "class='pareto recommended'" in body


def test_markdown_and_terminal_mark_pareto_rows():
    comp = _comp()
    md = comparison.markdown(comp).splitlines()
    marked = [l.split("|")[1].strip() for l in md[2:8] if l.split("|")[2].strip() == "*"]
    assert marked == ["original", "rtn-w8-ch", "rtn-w4-g64", "rtn-w3-g64"]
    term = comparison.terminal(comp).splitlines()
    assert term[-1].startswith("select: rtn-w4-g64")
    assert [l.split()[1] for l in term[2:8] if l.startswith("*")] == marked
    assert any("FAILED: group size 128" in l for l in term)


def test_csv_lists_fits_and_pareto_joined():
    text = comparison.csv_text(_comp())
    lines = text.splitlines()
    assert lines[0].startswith("name,status,error,method")
    assert len(lines) == 7
    assert "8 GB;12 GB" in lines[1] and "perplexity;kl_divergence" in lines[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_report_renders_offline_in_headless_chromium(tmp_path):
    from PIL import Image

    paths = comparison.write(_comp(), tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run([
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", "--window-size=1400,1000", paths["html"].as_uri(),
    ], check=True, capture_output=True, timeout=120)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 1000)
    colors = img.getcolors(maxcolors=1 << 20)
    # A blank or error page has a handful of colours; table shading, text and the plot many.
    assert colors is not None and len(colors) > 200
    # The Pareto rows' orange shading (#fff4e0) and the failed row's red (#fde8e8) are on screen.
    present = {c for _, c in colors}
    assert (0xFF, 0xF4, 0xE0) in present and (0xFD, 0xE8, 0xE8) in present


def test_html_false_writes_tables_only(tmp_path):
    paths = comparison.write(_comp(), tmp_path, html=False)
    assert sorted(p.name for p in paths.values()) == ["comparison.csv", "comparison.json", "comparison.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison.csv", "comparison.json", "comparison.md"]
