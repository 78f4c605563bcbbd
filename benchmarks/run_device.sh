#!/usr/bin/env bash
# A GPU run in one command: install, then the named jobs; logs and JSON under $OUT (default
# out/device). Each job gets T_<job> (or JOB_TIMEOUT, default 900) seconds. A ./wheels folder
# (benchmarks/fetch_wheels.sh, on a machine with network) is installed first: the data jobs
# need grain and tensorflow-datasets.
#
#   bash benchmarks/run_device.sh JOB [JOB ...]
#
# Jobs:
#   tests      pytest -m gpu (every kernel compiled against its reference, the model on the GPU)
#   compare    python -m benchmarks compare --baseline baseline (this tree vs an earlier checkout
#              in ./baseline: the S128K decode grid and the 350m train step, same run)
#   <suite>    python -m benchmarks <suite> $ARGS_<suite> (decode, train, generate, selector, ...)
#   delt       continue the DELT fair study (experiments/delt/fair.py) from the repository's scores
#              and results (experiments/delt/fair_results), seeds 0-4, starting no run that would
#              end after T_delt - 60 s; $OUT/delt_results.tgz holds every result so far
#   delt_proxy the DELT ablation with a weaker proxy (PROXY_STEPS pretraining steps, default
#              260): conventional, Folding L3, sorted and LQS top-50% (same steps) at 1 epoch,
#              seeds 0-4, its own folder;
#              $OUT/delt_proxy_results.tgz holds its scores and results
#   seer_quality  the 4K long-context model (configs/longctx.yaml, 2,500 steps, runs/lc; resumes),
#              then the SeerAttention selector table (experiments/seer_prefill/run.py) and YaRN
#              fine-tuning at 4x context (yarn.py); each phase resumes, so calls on one warm
#              machine continue where the last stopped; results under $OUT/seer_quality
#   seer_yarn  only the YaRN part of seer_quality (runs/lc trained first if absent): fine-tuning at
#              4x context and the selector table there (gate vs static / recency / oracle at
#              --density); YARN_ARGS: more yarn.py arguments (both steps); results under
#              $OUT/seer_yarn
#   seer_retrieval  the SeerAttention selector table on a model that uses distant context:
#              configs/longctx.yaml trained 9,000 steps on real text with 30% passkey and 30% copy
#              documents (experiments/sparse_quality's data + train phases, runs/sq9k; a call
#              that runs out of time pauses the training and the next call continues), then
#              experiments/seer_prefill/run.py on it with the repeated-text sets (--repeat-eval);
#              results under $OUT/seer_retrieval. About three calls of 600 s on an H100.
#              SEER_ARGS: more run.py arguments, last (e.g. "--d-gate 128 --gate-steps 1500
#              --gate-batch 8"; a later flag wins)
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
    delt)
      export EFFJAX_DATA_ROOT=${EFFJAX_DATA_ROOT:-$PWD/shared_data}
      mkdir -p runs/delt_fair /tmp/evals && cp data/tinyshakespeare/input.txt /tmp/evals/tinyshakespeare.txt
      cp -rn experiments/delt/fair_results/scores experiments/delt/fair_results/results runs/delt_fair/
      timeout "$T" python3 experiments/delt/fair.py run --out runs/delt_fair --seeds 0 1 2 3 4 \
        --time-limit $((T - 60)) --eval-source /tmp/evals/tinyshakespeare.txt 2>&1 \
        | tee "$OUT/delt.log" | grep -v "^    " | tail -30
      tar czf "$OUT/delt_results.tgz" -C runs/delt_fair results ;;
    delt_proxy)
      # the weaker-proxy ablation: LQS from a proxy pretrained PROXY_STEPS steps (default 260, a
      # tenth of the main study's), conventional / Folding L3 / sorted / LQS top-50% (same steps)
      # at 1 epoch, seeds 0-4, in its own study folder (resumes from
      # experiments/delt/fair_results_proxy<steps>; a second call finishes what the scoring left)
      export EFFJAX_DATA_ROOT=${EFFJAX_DATA_ROOT:-$PWD/shared_data}
      ps=${PROXY_STEPS:-260}; d=runs/delt_proxy$ps; src=experiments/delt/fair_results_proxy$ps
      mkdir -p $d /tmp/evals && cp data/tinyshakespeare/input.txt /tmp/evals/tinyshakespeare.txt
      [ -d $src ] && cp -rn $src/scores $src/results $d/ 2>/dev/null
      timeout "$T" python3 experiments/delt/fair.py run --out $d --seeds 0 1 2 3 4 --budgets 1 \
        --conditions conventional folding_lqs_L3 sorted_lqs lqs_top50_L3_same_steps \
        delt.proxy_pretrain_steps=$ps \
        --time-limit $((T - 60)) --eval-source /tmp/evals/tinyshakespeare.txt 2>&1 \
        | tee "$OUT/delt_proxy.log" | grep -v "^    " | tail -30
      tar czf "$OUT/delt_proxy_results.tgz" -C $d results scores ;;
    seer_quality|seer_yarn)
      export EFFJAX_DATA_ROOT=${EFFJAX_DATA_ROOT:-$PWD/shared_data}
      wiki="$EFFJAX_DATA_ROOT/wikitext-2/valid.txt"
      table="python3 experiments/seer_prefill/run.py --run runs/lc --out runs/seer_quality \
          --gate-steps 300 --n-eval 16 --eval-source $wiki \
          --selectors gate,oracle,static,gate+local,recency+local,oracle+local &&"
      [ "$job" = seer_yarn ] && table=""          # the YaRN part alone
      timeout "$T" bash -c "python3 train.py --config configs/longctx.yaml train.steps=2500 \
          train.out_dir=runs/lc train.progress=false && $table \
        python3 experiments/seer_prefill/yarn.py --run runs/lc --out runs/seer_yarn \
          --steps 150 --eval-source $wiki ${YARN_ARGS:-}" 2>&1 | tee "$OUT/$job.log" \
        | grep -v Warn | tail -40
      mkdir -p "$OUT/$job/table" "$OUT/$job/yarn"
      cp runs/lc/metrics.jsonl runs/lc/summary.json "$OUT/$job/" 2>/dev/null
      [ "$job" = seer_quality ] && cp runs/seer_quality/*.json runs/seer_quality/*.md \
        runs/seer_quality/*.png runs/seer_quality/run.log "$OUT/$job/table/" 2>/dev/null
      cp runs/seer_yarn/*.json runs/seer_yarn/*.md runs/seer_yarn/*.png runs/seer_yarn/run.log \
        "$OUT/$job/yarn/" 2>/dev/null ;;
    seer_retrieval)
      export EFFJAX_DATA_ROOT=${EFFJAX_DATA_ROOT:-$PWD/shared_data}
      d=runs/sq9k
      timeout "$T" bash -c "python3 experiments/sparse_quality/run.py --out $d --steps 9000 \
          --batch 16 --seq 4096 --phases data train --train-seconds $((T - 40)) --resume-later \
        && test -f $d/train/train_done.json \
        && python3 experiments/seer_prefill/run.py --run $d/train --out runs/seer_retrieval \
          --gate-steps 300 --n-eval 16 --eval-source $d/data/heldout.txt --repeat-eval \
          --selectors gate,oracle,static,gate+local,recency+local,oracle+local ${SEER_ARGS:-}" 2>&1 \
        | tee "$OUT/seer_retrieval.log" | grep -v Warn | tail -40
      mkdir -p "$OUT/seer_retrieval"
      cp runs/seer_retrieval/*.json runs/seer_retrieval/*.md runs/seer_retrieval/*.png \
        runs/seer_retrieval/run.log "$OUT/seer_retrieval/" 2>/dev/null ;;
    pack)
      tar -czf /tmp/results.tgz -C "$OUT" . && mv /tmp/results.tgz "$OUT/results.tgz" && ls -la "$OUT" ;;
    *)
      a="ARGS_${job}"
      timeout "$T" python3 -m benchmarks "$job" --out "$OUT/$job.json" ${!a:-} 2>&1 | tee "$OUT/$job.log" | grep -v Warning | tail -60 ;;
  esac
done
date -u +%H:%M:%S > "$OUT/done"
