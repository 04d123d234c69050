#!/usr/bin/env bash
# The test suite, then the tests that train (marker `trains`) once more under perturbed
# numerics: oneDNN off, one thread, another training seed. Floating-point rounding differs
# between CPUs (AVX2, AVX-512, AMX), so these tests must hold under any of them.
# Usage: bash scripts/test.sh [pytest arguments for the first run]
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
echo "== the tests that train, again with TF_ENABLE_ONEDNN_OPTS=0, one thread, seed 1"
TF_ENABLE_ONEDNN_OPTS=0 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 OMP_NUM_THREADS=1 \
    GEMMA_KERAS_TRAIN_SEED=1 .venv/bin/python -m pytest -m trains -p no:cacheprovider -q
