#!/usr/bin/env bash
# The tuning study on a GPU, in one call (see scripts/gpu_setup.sh for the machine): full-length
# trials (50 epochs on all 40000 training images, as the real run), as many as fit in
# STUDY_SECONDS, then the winner written into params.yaml (`tune.py --apply`) and trained and
# evaluated through the stage scripts: its test accuracy and honest gap.
# Results go to $OUT (or a temporary folder): study.log, trials.csv, best_params.yaml,
# winner.log, metrics.json, history.csv.
#   EPOCHS=1 TRAIN_LIMIT=500 N_TRIALS=2 STUDY_SECONDS=60 scripts/gpu_study.sh   # a smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${EPOCHS:-50}
source scripts/gpu_setup.sh "train.epochs=$epochs" "data.train_limit=${TRAIN_LIMIT:-}" \
  "tune.epochs=$epochs" "tune.train_limit=${TRAIN_LIMIT:-}"
python3 src/fetch.py
python3 src/preprocess.py
# a trial started before the timeout runs to its end: leave it room under the call's limit
python3 src/tune.py --n-trials "${N_TRIALS:-50}" --timeout "${STUDY_SECONDS:-240}" --apply \
  --study-name gpu-full-length 2>&1 | tee "$out/study.log"
cp reports/best_params.yaml "$out"/
find mlruns -path '*/artifacts/study/trials.csv' -exec cp {} "$out"/ \;
run_stages train evaluate 2>&1 | tee "$out/winner.log"
cp reports/metrics.json reports/history.csv "$out"/
cd "$root"
echo "gpu_study: results in $out"
