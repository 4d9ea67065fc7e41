#!/usr/bin/env bash
# The tuning study on a GPU, in one call (see scripts/gpu_setup.sh for the machine): full-length
# trials (50 epochs on all 40000 training images, as the real run), as many as fit in
# STUDY_SECONDS, then the winner written into params.yaml (`tune.py --apply`) and trained and
# evaluated through the stage scripts: its test accuracy and honest gap.
# WORKERS (4) tune.py processes share the study (its SQLite storage, as workers on one machine
# do) and the GPU, which is large for one trial of this small model. Each JAX process
# gets an equal share of the GPU's memory instead of the 75% it takes by default.
# Results go to $OUT (or a temporary folder): study-N.log (worker N), trials.csv,
# best_params.yaml, winner.log, metrics.json, history.csv.
#   EPOCHS=1 TRAIN_LIMIT=500 N_TRIALS=3 STUDY_SECONDS=60 WORKERS=2 scripts/gpu_study.sh   # smoke
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${EPOCHS:-50}
source scripts/gpu_setup.sh "train.epochs=$epochs" "data.train_limit=${TRAIN_LIMIT:-}" \
  "tune.epochs=$epochs" "tune.train_limit=${TRAIN_LIMIT:-}"
python3 src/fetch.py
python3 src/preprocess.py
workers=${WORKERS:-4}
XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.9 / $workers, 3))")
export XLA_PYTHON_CLIENT_MEM_FRACTION
# a trial running when STUDY_SECONDS pass stops after its epoch (tune.py --timeout) and is
# queued again for a later study run
pids=()
for worker in $(seq "$workers"); do
  python3 src/tune.py --n-trials "${N_TRIALS:-50}" --timeout "${STUDY_SECONDS:-240}" \
    --study-name gpu-full-length >"$out/study-$worker.log" 2>&1 &
  pids+=($!)
done
failed=()  # every worker is waited for; then a failed one ends the call, naming its log
for index in "${!pids[@]}"; do
  wait "${pids[$index]}" || failed+=("$out/study-$((index + 1)).log")
done
if ((${#failed[@]})); then
  for log in "${failed[@]}"; do
    echo "gpu_study: a tuning worker failed; the end of its log, $log:" >&2
    tail -n 5 "$log" >&2
  done
  exit 1
fi
# every worker has stopped: this one trains nothing, it prints the report and applies the winner
rm -f reports/best_params.yaml
python3 src/tune.py --report-only --apply --study-name gpu-full-length 2>&1 | tee "$out/study.log"
find mlruns -path '*/artifacts/study/trials.csv' -exec cp {} "$out"/ \;
if [ ! -f reports/best_params.yaml ]; then
  cd "$root"
  echo "gpu_study: no winner: no complete trial meets tune.max_gap (or none finished in" \
    "STUDY_SECONDS); nothing applied or trained; the study's report is in $out/study.log"
  exit 0
fi
cp reports/best_params.yaml "$out"/
run_stages train evaluate 2>&1 | tee "$out/winner.log"
cp reports/metrics.json reports/history.csv "$out"/
cd "$root"
echo "gpu_study: results in $out"
