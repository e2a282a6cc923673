#!/usr/bin/env bash
# Create .venv with everything Prism needs on a fresh machine: the CPU build of torch, the
# serving stack and the test tools. Idempotent; re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Debian's redis-server: the stage queues and the request store (tests start their own).
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server >/dev/null; }
fi
# Node.js and npm: the Node client's test and buf (the proto linter, from npm).
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get install -y -q nodejs npm >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q nodejs npm >/dev/null; }
fi
if [ ! -d clients/node/node_modules ]; then
  (cd clients/node && npm install --no-audit --no-fund --loglevel=error >/dev/null)  # npm ci trips over the lock's other-platform optional packages
fi
if [ ! -d deploy/k8s/check/node_modules ]; then  # KEDA's CRD schemas, for validating deploy/k8s
  (cd deploy/k8s/check && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pin the CPU build first: an unpinned torch would pull gigabytes of CUDA packages.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[serve,dev]"
