#!/usr/bin/env bash
# The GPU check, in one call on a machine with JAX and a GPU, without TensorFlow or internet:
#   1. install the carried wheels (.whl/, from scripts/gpu_prepare.sh) where a package is missing
#   2. build the real CIFAR-10 archive from the carried JPEGs (.gpu/)
#   3. run the default 50-epoch pipeline on the jax backend: the stage scripts in order, in a
#      scratch copy of the project (DVC's wheels do not fit the 64 MiB a call carries)
#   4. benchmarks/bench_train.py on JAX: the pipeline against plain Keras on the same images
#      (ratio of epoch times), then with flips and pad-and-crop at batch 128 against plain Keras
#      without augmentation
# Results go to $OUT (or a temporary folder): pipeline.log, metrics.json, history.csv,
# bench_default.json, bench_augment.json.
#   EPOCHS=2 TRAIN_LIMIT=2000 IMAGES=2000 scripts/gpu_check.sh     # a smoke run, any machine
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-$(mktemp -d)}
epochs=${EPOCHS:-50}
images=${IMAGES:-40000}
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"

work=$(mktemp -d)
cp -r src benchmarks params.yaml dvc.yaml "$work"/
archive=$work/cifar-10-binary.tar.gz
md5=$(python3 .gpu/tools/cifar10_jpg_to_binary.py "$archive" | sed -n 's/^md5 //p')
cd "$work"
python3 - "$archive" "$md5" "$epochs" "${TRAIN_LIMIT:-}" <<'PY'
import sys
sys.path.insert(0, "src")
from params import update_yaml
archive, md5, epochs, limit = sys.argv[1:]
update_yaml("params.yaml", {"data.source": archive, "data.md5": md5, "train.backend": "jax",
                            "train.epochs": int(epochs),
                            "data.train_limit": int(limit) if limit else None})
PY
{
  for stage in fetch preprocess train evaluate; do
    start=$(date +%s.%N)
    python3 "src/$stage.py"
    echo "$stage: $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')") s wall"
  done
} 2>&1 | tee "$out/pipeline.log"
cp reports/metrics.json reports/history.csv "$out"/

bench=(python3 benchmarks/bench_train.py --archive "$archive" --images "$images" --epochs 3
       --rounds 1 --set train.backend=jax)
"${bench[@]}" --json "$out/bench_default.json" | tee "$out/bench_default.log"
"${bench[@]}" --set train.batch_size=128 --set augment.flip=true --set augment.crop=4 \
  --json "$out/bench_augment.json" | tee "$out/bench_augment.log"
cd "$root"
echo "gpu_check: results in $out"
