#!/usr/bin/env bash
# Prepare the GPU check (scripts/gpu_check.sh) on a machine with internet: what the GPU machine
# lacks goes into two git-ignored folders that travel with the working tree (64 MiB at most):
#   .whl/  wheels of the pure-Python packages and small extensions the GPU image does not have
#          (Python 3.12, manylinux x86-64; the image has JAX, numpy, pandas, Pillow, pytest)
#   .gpu/  the CIFAR-10 JPEGs and their converter, in the layout the converter expects
# Usage: scripts/gpu_prepare.sh [path/to/shared]   (default: ../shared beside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}

mkdir -p .gpu/tools .gpu/data .whl
cp "$shared/tools/cifar10_jpg_to_binary.py" .gpu/tools/
cp "$shared/data/cifar10-jpg.tar.gz" .gpu/data/

# Keras, Optuna, the params schema and MLflow's client with its sqlite store; versions as in this .venv
# where it has them, so the GPU run uses what the tests ran.
packages=(keras namex optuna colorlog optree pydantic pydantic-core annotated-types typing-inspection
          ruamel.yaml mlflow-skinny mlflow-tracing sqlalchemy alembic mako greenlet
          cachetools databricks-sdk google-auth pyasn1 pyasn1-modules rsa fastapi starlette
          uvicorn gitpython gitdb smmap importlib-metadata opentelemetry-api
          opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
          python-dotenv sqlparse)
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
pins=()
for name in "${packages[@]}"; do
  version=$("$python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
  pins+=("$name${version:+==$version}")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
du -sh .whl .gpu
