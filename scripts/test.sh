#!/usr/bin/env bash
# The test command: bootstrap, check the generated protocol code, run every test that needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python scripts/gen_protos.py --check
.venv/bin/python -m pytest -m "not gpu" "$@"
