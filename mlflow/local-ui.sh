#!/usr/bin/env bash
# Open the MLflow UI on the platform's local state (the embedded defaults):
#   mlflow/local-ui.sh            -> http://127.0.0.1:5000
#   PORT=5050 mlflow/local-ui.sh
# It reads $MLFLOW_TRACKING_URI when set, else $LENS_HOME/mlflow.db (LENS_HOME defaults to .lens).
# This folder holds MLflow server configuration only: no __init__.py, so it never shadows
# the mlflow package.
set -euo pipefail
cd "$(dirname "$0")/.."
home="$(realpath -m "${LENS_HOME:-.lens}")"
store="${MLFLOW_TRACKING_URI:-sqlite:///$home/mlflow.db}"
export MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/mlflow server --backend-store-uri "$store" \
  --default-artifact-root "$home/mlartifacts" \
  --host 127.0.0.1 --port "${PORT:-5000}" --workers 1
