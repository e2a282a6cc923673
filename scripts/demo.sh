#!/usr/bin/env bash
# The main job: bootstrap, build the tiny models if missing, bring the four services up as
# processes and send real requests (text, one image, two images, audio) through them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/prism demo "$@"
