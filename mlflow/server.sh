#!/usr/bin/env bash
# The team MLflow server in the foreground, started exactly as `lens services up` starts it
# (lens/services.py: the admin-password policy, missing databases created, the basic-auth
# config, `mlflow db upgrade`, then `mlflow server`), for a terminal or a container entrypoint.
# The same environment variables (mlflow/README.md):
#   LENS_MLFLOW_ADMIN_PASSWORD=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
#     MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000 mlflow/server.sh
#   mlflow/server.sh --print        # the server command as JSON, nothing started
set -euo pipefail
cd "$(dirname "$0")/.."
py=python3
[[ -x .venv/bin/python ]] && py=.venv/bin/python
exec "$py" -m lens.infra serve mlflow "$@"
