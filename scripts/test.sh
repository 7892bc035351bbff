#!/usr/bin/env bash
# Install everything, then run the test suite (ecosystem tests skip unless their packages exist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest -q "$@"
