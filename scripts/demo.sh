#!/usr/bin/env bash
# Newcomer's main job: set up, fetch the default model (SmolLM2-135M) and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/aligncodec demo "$@"
