#!/usr/bin/env bash
# On a machine with a CUDA GPU (not in CI): prune -> recover (a few steps) -> export -> eval on a
# ~100M-parameter Llama built from config, in under 5 minutes, then a table of times and memory.
#   benchmarks/gpu_check.sh [--workdir runs/gpu-check] [--steps 8]
# Needs torch with CUDA (pip install torch, without the CPU-only pin) and `pip install -e '.[test]'`.
set -euo pipefail
cd "$(dirname "$0")"
exec python gpu_check.py "$@"
