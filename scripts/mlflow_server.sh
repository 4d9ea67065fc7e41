#!/usr/bin/env bash
# MLflow tracking server on PostgreSQL, serving artifacts from a directory (or bucket) it owns.
#
#     scripts/mlflow_server.sh                     # postgresql://postgres@127.0.0.1:5432/mlflow
#     MLFLOW_PORT=5001 scripts/mlflow_server.sh --workers 2
#     export MLFLOW_TRACKING_URI=http://127.0.0.1:5000   # then dvc repro / python src/tune.py
#
# Settings, all from the environment (extra arguments go to `mlflow server` as they are):
#   MLFLOW_BACKEND_STORE_URI      runs, params, metrics
#                                 (default postgresql://postgres@127.0.0.1:5432/mlflow)
#   MLFLOW_ARTIFACTS_DESTINATION  artifact files (default ./mlartifacts; s3://... works too)
#   MLFLOW_HOST, MLFLOW_PORT      where to listen (default 127.0.0.1 and 5000)
# A PostgreSQL database that does not exist yet is created first (createdb). Credentials come from
# the environment only (PGPASSWORD, PGPASSFILE, PGSSLMODE, ... as libpq reads them), never from a
# file this script writes; keep them out of MLFLOW_BACKEND_STORE_URI where you can. Listening on
# anything but loopback: also pass --allowed-hosts (and --cors-allowed-origins for web apps), and
# put authentication in front (--app-name basic-auth or a proxy).
set -euo pipefail

backend="${MLFLOW_BACKEND_STORE_URI:-postgresql://postgres@127.0.0.1:5432/mlflow}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"

# Create the PostgreSQL database when missing; libpq takes the URI without SQLAlchemy's "+driver".
if [[ "$backend" =~ ^postgres(ql)?(\+[a-z0-9_]+)?:// ]]; then
    libpq="postgresql://${backend#*://}"
    without_query="${libpq%%\?*}"
    query="${libpq#"$without_query"}"
    authority_path="${without_query#postgresql://}"
    if [[ "$authority_path" != */?* ]]; then
        echo "mlflow_server.sh: no database name in MLFLOW_BACKEND_STORE_URI" >&2
        exit 2
    fi
    database="${authority_path##*/}"
    maintenance="postgresql://${authority_path%/*}/postgres${query}"
    exists="$(psql "$maintenance" -XtAq -v ON_ERROR_STOP=1 -v db="$database" \
        <<< "SELECT 1 FROM pg_database WHERE datname = :'db';")"
    if [[ "$exists" != 1 ]]; then
        echo "mlflow_server.sh: creating database ${database}" >&2
        createdb --maintenance-db="$maintenance" -- "$database"
    fi
fi

if [[ "$artifacts" != *://* ]]; then
    mkdir -p -- "$artifacts"
fi

exec mlflow server \
    --backend-store-uri "$backend" \
    --serve-artifacts --artifacts-destination "$artifacts" \
    --host "$host" --port "$port" \
    "$@"
