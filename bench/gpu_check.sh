#!/usr/bin/env bash
# The GPU check: the CUDA tests, then bench/gpu_check.py's table (training tokens/s, MFU and
# peak memory against the estimate at d20's and gpt2's shapes; decoding; the gpt2 plan on 8 GPUs).
# About 8 minutes on one H100. Without CUDA it fails at once, with one line: it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: bench/gpu_check.sh needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== the CUDA tests (pytest -m cuda)"
timeout 180 "$PY" -m pytest -q -m cuda -p no:randomly tests
echo "== bench/gpu_check.py"
timeout 420 "$PY" bench/gpu_check.py "$@"
