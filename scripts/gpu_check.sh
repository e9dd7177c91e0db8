#!/usr/bin/env bash
# The GPU check, for the first machine with CUDA: the `gpu`-marked tests (snapshots with no host synchronisation,
# checked with torch.cuda.set_sync_debug_mode("error"); averages and soups on the device against float64
# references), then the averaging and greedy-soup benchmarks with --device cuda. Everything it prints goes to
# $OUT_DIR (default gpu-results/): gpu-tests.txt, RESULTS-cuda.md, bench.log, nvidia-smi.txt. Under 8 minutes.
#
#   scripts/gpu_check.sh            # or: make gpu-check
#   PYTHON=/path/to/python OUT_DIR=/tmp/out scripts/gpu_check.sh
#
# Exit status: 0 all passed, 1 a test or benchmark failed (or no torch), 3 no CUDA device (nothing was run).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR=${OUT_DIR:-gpu-results}
mkdir -p "$OUT_DIR"
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
found=$?
if [ "$found" -eq 3 ]; then
    echo "gpu_check: no CUDA device visible to $PYTHON; nothing to check." | tee "$OUT_DIR/gpu-tests.txt"
    exit 3
elif [ "$found" -ne 0 ]; then
    echo "gpu_check: $PYTHON cannot import torch; run 'make install' or set PYTHON=..." >&2
    exit 1
fi
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
start=$(date +%s)

# 1. The gpu-marked tests (about a minute).
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 180 "$PYTHON" -m pytest -p no:cacheprovider -m gpu tests -q -rs \
    2>&1 | tee "$OUT_DIR/gpu-tests.txt"
tests=${PIPESTATUS[0]}

# 2. The benchmarks on CUDA (about five minutes): figures in RESULTS-cuda.md.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 330 "$PYTHON" benchmarks/run_all.py --only averaging greedy_soup \
    --device cuda --out "$OUT_DIR/RESULTS-cuda.md" > "$OUT_DIR/bench.log" 2>&1
bench=$?
tail -n 60 "$OUT_DIR/RESULTS-cuda.md" 2>/dev/null || tail -n 40 "$OUT_DIR/bench.log"

echo "gpu_check: tests exit $tests, benchmarks exit $bench, $(( $(date +%s) - start )) s; files in $OUT_DIR/"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
