#!/bin/sh
# MLflow tracking server: runs and metrics in PostgreSQL, artifacts served from a folder (a volume).
#
#   MLFLOW_BACKEND_STORE_URI      postgresql://USER:PASSWORD@HOST:5432/DB (required)
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts are stored (default /mlflow/artifacts)
#   MLFLOW_HOST, MLFLOW_PORT      listen address (default 0.0.0.0:5000)
#   MLFLOW_WORKERS                server worker processes (default 4)
#   MLFLOW_AUTH=true              switch on HTTP basic auth; then also:
#     MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD   the admin created on first start
#     MLFLOW_FLASK_SERVER_SECRET_KEY  a random string, the same across restarts
#     MLFLOW_AUTH_DATABASE_URI    user store (default sqlite:///<artifacts>/../basic_auth.db)
#     MLFLOW_AUTH_DEFAULT_PERMISSION  what users get on others' experiments (default READ)
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers the server answers (read by mlflow itself)
#
#   mlflow-server health          exit 0 when the running server answers /health (the image's HEALTHCHECK)
set -eu

if [ "${1:-}" = health ]; then
  host="${MLFLOW_HOST:-0.0.0.0}"
  case "$host" in 0.0.0.0 | :: | "") host=127.0.0.1 ;; esac
  exec python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
    "http://$host:${MLFLOW_PORT:-5000}/health"
fi

: "${MLFLOW_BACKEND_STORE_URI:?must be set, e.g. postgresql://mlflow:PASSWORD@postgres:5432/mlflow}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-/mlflow/artifacts}"
mkdir -p "$artifacts"

set -- --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$artifacts" --serve-artifacts \
    --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-4}"

case "${MLFLOW_AUTH:-false}" in
  true)
    : "${MLFLOW_AUTH_ADMIN_PASSWORD:?must be set when MLFLOW_AUTH=true}"
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?must be set when MLFLOW_AUTH=true (signs the CSRF tokens)}"
    config="$(mktemp -d)/basic_auth.ini"
    cat > "$config" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
admin_username = admin
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$(dirname "$artifacts")/basic_auth.db}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    export MLFLOW_AUTH_CONFIG_PATH="$config"
    set -- "$@" --app-name basic-auth
    ;;
  false) ;;
  *)
    echo "mlflow-server: MLFLOW_AUTH=${MLFLOW_AUTH}: expected true or false" >&2
    exit 2
    ;;
esac

exec mlflow server "$@"
