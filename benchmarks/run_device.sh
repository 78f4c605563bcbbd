#!/usr/bin/env bash
# One full GPU session on the device machine: install, GPU tests, train-step benchmark.
# Usage (device tool, carry ["wheels"]): bash benchmarks/run_device.sh [bench_train args...]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --find-links wheels --no-build-isolation grain tensorflow-datasets importlib_resources 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import jax; print(jax.__version__, jax.devices())"
python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
python3 benchmarks/bench_train.py --out "$OUT/train.json" "$@" 2>&1 | tee "$OUT/bench_train.log" | grep -v '^{'
