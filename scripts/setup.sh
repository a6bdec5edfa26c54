#!/usr/bin/env bash
# Create .venv (if missing) and install aligncodec with its evaluation and test extras.
# torch is pinned to 2.13.0: on these machines that takes the CPU build already on disk
# (an unpinned torch would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[eval,test]"
