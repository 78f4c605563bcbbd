#!/usr/bin/env bash
# GPU session script for the device machine: install, then the named jobs, logs and JSON under $OUT.
#
#   bash benchmarks/run_device.sh JOB [JOB ...]        (device tool, carry ["wheels"] or more)
#
# Jobs:
#   tests     pytest -m gpu (cuDNN attention, Triton decode kernels, decode through the kernels)
#   train     bench_train.py on configs/350m.yaml, seq 2048, batch 8 and 16 (BENCH_ARGS overrides)
#   decode    bench_decode.py --quick (DECODE_ARGS overrides, e.g. the full sweep)
#   tune      tune_decode.py: launch-parameter grid of both decode kernels + selector costs
#   generate  bench_generate.py: end-to-end decode tokens/s at 32K context (GENERATE_ARGS)
#   scoring   bench_scoring.py on configs/base.yaml, seq 1024 (needs ~5 min)
#   quality   experiments/sparse_quality/run.py (carry "shared_data"; T_quality=560, ~9 min)
#   delt-pds1 the DELT experiment's missing run (PDS + Folding, seed 1); needs carry "shared_data"
# Each job is given T_<job> or JOB_TIMEOUT seconds (default 280) so one hang cannot eat the call.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T=${JOB_TIMEOUT:-280}
python3 -m pip install -q --no-index --find-links wheels --no-build-isolation grain tensorflow-datasets importlib_resources 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
for job in "$@"; do
  echo "=== $job"
  v="T_${job//-/_}"; T=${!v:-${JOB_TIMEOUT:-280}}   # per-job limit: T_<job> (e.g. T_scoring=240)
  case "$job" in
    tests)
      timeout "$T" python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25 ;;
    train)
      timeout "$T" python3 benchmarks/bench_train.py --out "$OUT/train.json" ${BENCH_ARGS:---config configs/350m.yaml --seq 2048 --batch 8 --batch 16} 2>&1 | tee "$OUT/bench_train.log" | grep -v '^{' ;;
    decode)
      timeout "$T" python3 benchmarks/bench_decode.py ${DECODE_ARGS:---quick} --out "$OUT/decode.json" 2>&1 | tee "$OUT/bench_decode.log" | tail -40 ;;
    tune)
      timeout "$T" python3 benchmarks/tune_decode.py --out "$OUT/tune.json" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" | grep -E "^--|cudnn|default|Error|error" ;;
    scoring)
      timeout "$T" python3 benchmarks/bench_scoring.py --config configs/base.yaml --seq 1024 --chunk 8 --train-batch 32 --proj 8192 ${SCORING_ARGS:-} --out "$OUT/scoring.json" 2>&1 | grep -v Warning | tee "$OUT/bench_scoring.log" ;;
    generate)
      timeout "$T" python3 benchmarks/bench_generate.py ${GENERATE_ARGS:-} --out "$OUT/generate.json" 2>&1 | tee "$OUT/bench_generate.log" ;;
    quality)
      timeout "$T" python3 experiments/sparse_quality/run.py --out /tmp/sparse_quality --results-dir "$OUT" ${QUALITY_ARGS:---steps 2000 --batch 16 --seq 4096 --train-seconds 260} 2>&1 | tail -80 ;;
    delt-pds1)
      timeout "$T" python3 experiments/delt/run_experiment.py data.source=shared_data/nltk-english-mix delt.reference_source=shared_data/wikitext-2/valid.txt delt.cache_dir=/tmp/delt_cache train.checkpoint_every=1000 train.eval_every=1000 --seeds 1 --conditions pds_folding --out /tmp/delt_pds1 2>&1 | grep -vE "^    (model|DELT|using)"
      cp /tmp/delt_pds1/results_partial.json "$OUT/partial_seed1_pds.json" ;;
    *) echo "unknown job $job" ;;
  esac
done
