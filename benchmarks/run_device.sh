#!/usr/bin/env bash
# GPU session script for the device machine: install, then the named jobs, logs and JSON under $OUT.
#
#   bash benchmarks/run_device.sh JOB [JOB ...]        (device tool, carry ["wheels"] or more)
#
# Jobs:
#   tests     pytest -m gpu (cuDNN attention, Triton decode kernels, decode through the kernels)
#   kernels   pytest -m gpu tests/kernels (the kernel equivalence tests only; KERNEL_TESTS: paths)
#   train     bench_train.py on configs/350m.yaml, seq 2048, batch 8 and 16 (BENCH_ARGS overrides)
#   decode    bench_decode.py --quick (DECODE_ARGS overrides, e.g. the full sweep)
#   tune      tune_decode.py: launch-parameter grid of both decode kernels + selector costs
#   generate  bench_generate.py: end-to-end decode tokens/s at 32K context (GENERATE_ARGS)
#   scoring   bench_scoring.py on configs/base.yaml, seq 1024 (needs ~5 min)
#   quality   experiments/sparse_quality/run.py (carry "shared_data"; ~12 min: use quality-bg / quality-wait)
#   delt-pds1 the DELT experiment's missing run (PDS + Folding, seed 1); needs carry "shared_data"
#   selector  bench_selector.py: gate scores / top-k / both, per call (SELECTOR_ARGS)
#   extend    bench_extend.py: multi-token (rectification) attention, Triton vs XLA (EXTEND_ARGS)
#   profile   profile_decode.py: per-kernel device time of a gated sparse step (PROFILE_ARGS)
#   quality-bg    start the quality run detached (setsid: it outlives this call; GPU memory 60%,
#                 later jobs of this call allocate on demand), QUALITY_ARGS as for quality
#   quality-wait  wait (T_quality_wait) for the detached run; copy its log and results to $OUT.
#                 A next call on the still-warm machine (within its 30 s idle window) can wait more:
#                 bash benchmarks/run_device.sh quality-bg tests quality-wait   (call 1)
#                 bash benchmarks/run_device.sh quality-wait                     (call 2)
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
    kernels)
      timeout "$T" python3 -m pytest -m gpu -q -p no:cacheprovider ${KERNEL_TESTS:-tests/kernels} 2>&1 | tee "$OUT/pytest_gpu_kernels.log" | tail -8 ;;
    train)
      timeout "$T" python3 benchmarks/bench_train.py --out "$OUT/train.json" ${BENCH_ARGS:---config configs/350m.yaml --seq 2048 --batch 8 --batch 16} 2>&1 | tee "$OUT/bench_train.log" | grep -v '^{' ;;
    decode)
      timeout "$T" python3 benchmarks/bench_decode.py ${DECODE_ARGS:---quick} --out "$OUT/decode.json" 2>&1 | tee "$OUT/bench_decode.log" | grep -v Warning | cut -c1-330 | tail -60 ;;
    tune)
      timeout "$T" python3 benchmarks/tune_decode.py --out "$OUT/tune.json" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" | grep -E "^--|cudnn|default|Error|error" | cut -c1-400 ;;
    scoring)
      timeout "$T" python3 benchmarks/bench_scoring.py --config configs/base.yaml --seq 1024 --chunk 8 --train-batch 32 --proj 8192 ${SCORING_ARGS:-} --out "$OUT/scoring.json" 2>&1 | grep -v Warning | tee "$OUT/bench_scoring.log" ;;
    generate)
      timeout "$T" python3 benchmarks/bench_generate.py ${GENERATE_ARGS:-} --out "$OUT/generate.json" 2>&1 | tee "$OUT/bench_generate.log" ;;
    quality)
      timeout "$T" python3 experiments/sparse_quality/run.py --out /tmp/sparse_quality --results-dir "$OUT" ${QUALITY_ARGS:---steps 9000 --batch 16 --seq 4096} 2>&1 | tail -80 ;;
    delt-pds1)
      timeout "$T" python3 experiments/delt/run_experiment.py data.source=shared_data/nltk-english-mix delt.reference_source=shared_data/wikitext-2/valid.txt delt.cache_dir=/tmp/delt_cache train.checkpoint_every=1000 train.eval_every=1000 --seeds 1 --conditions pds_folding --out /tmp/delt_pds1 2>&1 | grep -vE "^    (model|DELT|using)"
      cp /tmp/delt_pds1/results_partial.json "$OUT/partial_seed1_pds.json" ;;
    selector)
      timeout "$T" python3 benchmarks/bench_selector.py --out "$OUT/selector.json" ${SELECTOR_ARGS:-} 2>&1 | tee "$OUT/selector.log" | tail -40 ;;
    extend)
      timeout "$T" python3 benchmarks/bench_extend.py --out "$OUT/extend.json" ${EXTEND_ARGS:-} 2>&1 | tee "$OUT/extend.log" | tail -20 ;;
    profile)
      timeout "$T" python3 benchmarks/profile_decode.py --out "$OUT/profile_decode.json" ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile_decode.log" | tail -60 ;;
    quality-bg)
      if [ ! -d shared_data ] && [ ! -d ../shared/data ]; then
        echo "quality-bg: no shared_data/ here -- make it before the call (mkdir shared_data && cp -r ../shared/data/nltk-english-mix ../shared/data/wikitext-2 shared_data/) and carry it"
      elif [ -f /tmp/sq_bg.pid ] && kill -0 "$(cat /tmp/sq_bg.pid)" 2>/dev/null; then
        echo "quality run already running (pid $(cat /tmp/sq_bg.pid))"
      else
        rm -f /tmp/sq_bg.rc
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 setsid nohup bash -c "python3 experiments/sparse_quality/run.py \
          --out /tmp/sparse_quality --results-dir /tmp/sq_results ${QUALITY_ARGS:---steps 9000 --batch 16 --seq 4096} \
          > /tmp/sq_bg.log 2>&1; echo \$? > /tmp/sq_bg.rc" > /dev/null 2>&1 &
        echo $! > /tmp/sq_bg.pid
        echo "quality run started in the background (log /tmp/sq_bg.log)"
      fi
      export XLA_PYTHON_CLIENT_PREALLOCATE=false ;;
    quality-wait)
      end=$((SECONDS + T))
      while [ ! -f /tmp/sq_bg.rc ] && [ $SECONDS -lt $end ]; do sleep 5; done
      if [ -f /tmp/sq_bg.rc ]; then echo "quality run finished, rc $(cat /tmp/sq_bg.rc)"; else echo "quality run still running"; fi
      tail -40 /tmp/sq_bg.log
      cp /tmp/sq_bg.log "$OUT/quality_run.log" 2>/dev/null
      for f in results.json REPORT.md retrieval.png drift.png rectify_phase.png loss.png train_metrics.jsonl; do
        [ -f "/tmp/sq_results/$f" ] && cp "/tmp/sq_results/$f" "$OUT/"
      done
      ;;
    *) echo "unknown job $job" ;;
  esac
done
