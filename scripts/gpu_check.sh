#!/usr/bin/env bash
# The GPU check, in one call on a machine with JAX and a GPU, without TensorFlow or internet:
#   1-2. scripts/gpu_setup.sh: the carried wheels, the real archive, a scratch copy on jax
#   3. run the default 50-epoch pipeline on the jax backend: the stage scripts in order
#   4. benchmarks/bench_train.py on JAX: the pipeline against plain Keras on the same images
#      (ratio of epoch times), then with flips and pad-and-crop at batch 128 against plain Keras
#      without augmentation
# Results go to $OUT (or a temporary folder): pipeline.log, metrics.json, history.csv,
# bench_default.json, bench_augment.json.
#   EPOCHS=2 TRAIN_LIMIT=2000 IMAGES=2000 scripts/gpu_check.sh     # a smoke run, any machine
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${EPOCHS:-50}
images=${IMAGES:-40000}
source scripts/gpu_setup.sh "train.epochs=$epochs" "data.train_limit=${TRAIN_LIMIT:-}"
run_stages fetch preprocess train evaluate 2>&1 | tee "$out/pipeline.log"
cp reports/metrics.json reports/history.csv "$out"/

bench=(python3 benchmarks/bench_train.py --archive "$archive" --images "$images" --epochs 3
       --rounds 1 --set train.backend=jax)
"${bench[@]}" --json "$out/bench_default.json" | tee "$out/bench_default.log"
"${bench[@]}" --set train.batch_size=128 --set augment.flip=true --set augment.crop=4 \
  --json "$out/bench_augment.json" | tee "$out/bench_augment.log"
cd "$root"
echo "gpu_check: results in $out"
