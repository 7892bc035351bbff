#!/usr/bin/env bash
# Build .venv-llmc: llm-compressor in its own environment, the second GPTQ peer of
# benchmarks/gptq_peers.py. Kept apart from .venv and .venv-peers because llm-compressor pins
# transformers 5.15-5.17, compressed-tensors 0.19.0 and auto-round, and would move their pins.
#
# Usage: bash scripts/setup-llmc.sh
# Known to work (CPU only, Python 3.11): torch 2.13.0+cpu, transformers 5.17.0, llmcompressor 0.14.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-llmc
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -c constraints.txt torch==2.13.0 transformers==5.17.0
"$VENV/bin/pip" install -q -c constraints.txt llmcompressor==0.14.0.1
# Nothing of ours goes in: the benchmark hands this environment the model folder and the
# calibration windows as files.
