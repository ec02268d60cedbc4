#!/usr/bin/env bash
# The test command (README): the whole suite on CPU, real vLLM engines, kernels under TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$PWD/.vllm-cache}"
exec "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider --durations=30 "$@"
