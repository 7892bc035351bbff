#!/usr/bin/env bash
# Build .venv-peers: a separate environment holding the GPTQ ecosystem (gptqmodel + optimum)
# so tests/formats/test_ecosystem_gptq.py can load our artifacts with the peers' own loaders.
# Kept apart from .venv because gptqmodel pins numpy and pulls datasets/torchao/accelerate.
#
# Usage: bash scripts/setup-peers.sh   (then: GPTQMODEL_CPU_WORKERS=2 .venv-peers/bin/pytest -m ecosystem tests/formats)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-peers
PY=${PYTHON:-python3}

# Same torch/transformers as the main venv (constraints.txt); gptqmodel 7.6.0 needs transformers>=5.14.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
cat constraints.txt > "$CONSTRAINTS"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" torch==2.13.0 transformers==5.17.0
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" gptqmodel==7.6.0 optimum pytest
# Our own package, without letting its dependency list move the pins above.
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" --no-deps -e .
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" safetensors click pyyaml pydantic tqdm psutil
