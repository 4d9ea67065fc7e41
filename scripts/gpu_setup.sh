# Sourced by scripts/gpu_check.sh and scripts/gpu_study.sh, from the repository root, on a machine
# with JAX (and a GPU), without TensorFlow or internet:
#   1. install the carried wheels (.whl/, from scripts/gpu_prepare.sh) on PYTHONPATH
#   2. build the real CIFAR-10 archive from the carried JPEGs (.gpu/)
#   3. copy the project into a scratch folder ($work, then the working directory; DVC's wheels do
#      not fit the 64 MiB a call carries, so the callers run the stage scripts themselves) whose
#      params.yaml reads that archive on the jax backend, with any "key=value" arguments as
#      `dvc exp run -S` would set them (values parsed as YAML; empty means null)
# Sets: root (the repository), out ($OUT or a temporary folder), work, archive; defines run_stages.
root=$PWD
out=${OUT:-$(mktemp -d)}
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
python3 - "data.source='$archive'" "data.md5='$md5'" "train.backend=jax" "$@" <<'PY'
import sys
import yaml
sys.path.insert(0, "src")
from params import update_yaml
pairs = (arg.partition("=") for arg in sys.argv[1:])
update_yaml("params.yaml", {key: yaml.safe_load(value) if value else None
                            for key, _, value in pairs})
PY

# run_stages STAGE...: the stage scripts in order, each one's wall time after its output
run_stages() {
  local stage start
  for stage in "$@"; do
    start=$(date +%s.%N)
    python3 "src/$stage.py"
    echo "$stage: $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')") s wall"
  done
}
