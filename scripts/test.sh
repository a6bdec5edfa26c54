#!/usr/bin/env bash
# Newcomer's test command (and what CI runs): set up, then the fast suite, then a small
# representative set of end-to-end tests on the real default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/pytest -q -m "not slow and not model"
.venv/bin/pytest -q -m fuzz tests/test_fuzz.py   # the mutation fuzzer: 20,000 inputs on the reader and loader
.venv/bin/aligncodec models fetch smollm2
.venv/bin/pytest -q -m "smoke"
