#!/usr/bin/env bash
# Install everything, then quantize SmolLM2-135M (RTN 8-bit and 4-bit g64) and print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
compress run configs/demo.yaml "$@"
