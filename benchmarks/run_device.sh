#!/usr/bin/env bash
# A GPU run in one command: install, then the named jobs; logs and JSON under $OUT (default
# out/device). Each job gets T_<job> (or JOB_TIMEOUT, default 900) seconds.
#
#   bash benchmarks/run_device.sh JOB [JOB ...]
#
# Jobs:
#   tests      pytest -m gpu (every kernel compiled against its reference, the model on the GPU)
#   compare    python -m benchmarks compare --baseline baseline (this tree vs an earlier checkout
#              in ./baseline: the S128K decode grid and the 350m train step, same run)
#   <suite>    python -m benchmarks <suite> $ARGS_<suite> (decode, train, generate, selector, ...)
#   pack       tar + gzip everything under $OUT into $OUT/results.tgz (few files travel back)
# Set EFFJAX_COMMIT=<commit> when the tree is a copy whose git metadata is not its own, so the
# results name the right commit. A run longer than one command may take: start it with `setsid nohup bash benchmarks/run_device.sh
# ... &`, then wait on $OUT/done in later commands.
set -uo pipefail
OUT=${OUT:-out/device}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d wheels ]; then
  python3 -m pip install -q --no-index --find-links wheels --no-build-isolation grain tensorflow-datasets importlib_resources 2>&1 | tail -2
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
for job in "$@"; do
  v="T_${job//-/_}"; T=${!v:-${JOB_TIMEOUT:-900}}
  echo "=== $job ($(date -u +%H:%M:%S), limit ${T}s)"
  case "$job" in
    tests)
      timeout "$T" python3 -m pytest -m gpu -q -p no:cacheprovider --durations=15 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40 ;;
    compare)
      timeout "$T" python3 -m benchmarks compare --baseline baseline --out "$OUT/compare.json" ${ARGS_compare:-} 2>&1 | tee "$OUT/compare.log" ;;
    pack)
      tar -czf /tmp/results.tgz -C "$OUT" . && mv /tmp/results.tgz "$OUT/results.tgz" && ls -la "$OUT" ;;
    *)
      a="ARGS_${job}"
      timeout "$T" python3 -m benchmarks "$job" --out "$OUT/$job.json" ${!a:-} 2>&1 | tee "$OUT/$job.log" | grep -v Warning | tail -60 ;;
  esac
done
date -u +%H:%M:%S > "$OUT/done"
