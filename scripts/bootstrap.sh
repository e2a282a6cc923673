#!/usr/bin/env bash
# Create .venv with everything Prism needs on a fresh machine: the CPU build of torch, the
# serving stack and the test tools. Idempotent; re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pin the CPU build first: an unpinned torch would pull gigabytes of CUDA packages.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[serve,dev]"
