"""The comparison report of a run: comparison.json/.csv/.md, plots (PNG) and a self-contained report.html."""
