#!/usr/bin/env bash
# GPU benchmarks for uio (bf16): training MFU for `large`, `xl` with FSDP2 + activation checkpointing
# on one GPU (largest batch that fits), and cached generation against Hugging Face `generate`.
#
#   bash bench/gpu.sh                 # on a CUDA machine; prints markdown tables for the README
#   bash bench/gpu.sh --no-compile    # extra arguments go to `bench/gpu.py all`
#
# Without a CUDA device it runs the CPU dry run instead (toy sizes, every code path, ~1 minute).
# GPU results also go to bench/results/gpu-<date>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  mkdir -p bench/results
  out="bench/results/gpu-$(date +%Y%m%d-%H%M%S).json"
  "$PY" bench/gpu.py all --json "$out" "$@"
  echo "results: $out"
else
  echo "no CUDA device: CPU dry run of the GPU benchmark (toy sizes; the numbers mean nothing)"
  "$PY" bench/gpu.py all --dry-run "$@"
fi
