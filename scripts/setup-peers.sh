#!/usr/bin/env bash
# Build .venv-peers: a separate environment holding the GPTQ ecosystem (gptqmodel + optimum)
# so tests/formats/test_ecosystem_gptq.py can load our artifacts with the peers' own loaders.
# Kept apart from .venv because gptqmodel pins numpy==2.2.6 and pulls datasets/torchao/accelerate.
#
# Usage:
#   bash scripts/setup-peers.sh
#   GPTQMODEL_CPU_WORKERS=2 .venv-peers/bin/python -m pytest -m ecosystem tests/formats
#
# Known to work (CPU only, Python 3.11): torch 2.13.0+cpu, transformers 5.17.0,
# gptqmodel 7.6.0 (needs transformers>=5.14), optimum 2.3.0, accelerate 1.15.0, numpy 2.2.6.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-peers
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# constraints.txt pins torch==2.13.0 and transformers==5.17.0, the same as the main venv.
"$VENV/bin/pip" install -q -c constraints.txt torch==2.13.0 transformers==5.17.0
# gptqmodel ships as an sdist whose setup builds no extension; its kernels JIT or fall back to torch.
"$VENV/bin/pip" install -q -c constraints.txt gptqmodel==7.6.0 optimum pytest
# Our package without its dependency list (which would not move the pins, but keeps this explicit).
"$VENV/bin/pip" install -q -c constraints.txt --no-deps -e .
"$VENV/bin/pip" install -q -c constraints.txt safetensors click pyyaml pydantic tqdm psutil
# benchmarks/format_parity.py draws the Wikipedia evaluation windows here too (numpy stays pinned).
"$VENV/bin/pip" install -q -c constraints.txt gensim numpy==2.2.6
