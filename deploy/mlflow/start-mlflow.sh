#!/bin/sh
# Start the MLflow tracking server of flyp-ray: Postgres for runs and users, an artifact store
# served through the server (clients need no bucket credentials), HTTP basic auth, and a Host
# header allow-list.
#
# Required environment (deploy/mlflow/mlflow.yaml sets it from Secrets):
#   MLFLOW_BACKEND_STORE_URI        postgresql://mlflow:<pw>@postgres:5432/mlflow
#   MLFLOW_AUTH_DATABASE_URI        postgresql://mlflow:<pw>@postgres:5432/mlflow_auth (users)
#   MLFLOW_ARTIFACTS_DESTINATION    s3://bucket/mlflow, gs://..., or a mounted folder
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the auth app's sessions and CSRF tokens
#   MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password, used on the first start only
# Optional:
#   MLFLOW_ALLOWED_HOSTS            Host headers to accept (default: the in-cluster names)
#   MLFLOW_WORKERS                  server worker processes (default 4)
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?set it to a postgresql:// URI}"
: "${MLFLOW_AUTH_DATABASE_URI:?set it to a postgresql:// URI for the user store}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set it to s3://..., gs://... or a folder}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set it to a long random string}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set the admin password (first start only)}"
allowed_hosts="${MLFLOW_ALLOWED_HOSTS:-mlflow.mlflow.svc.cluster.local:5000,mlflow.mlflow.svc:5000,mlflow:5000,localhost:5000,127.0.0.1:5000}"

# The auth app reads its settings from an ini file; keep the user store in Postgres too, so
# users survive a restart of the pod. Nobody but the admin may change anything by default.
auth_ini="$(mktemp -d)/basic_auth.ini"
cat > "$auth_ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
chmod 600 "$auth_ini"
export MLFLOW_AUTH_CONFIG_PATH="$auth_ini"

exec mlflow server \
    --host 0.0.0.0 \
    --port 5000 \
    --workers "${MLFLOW_WORKERS:-4}" \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --serve-artifacts \
    --app-name basic-auth \
    --allowed-hosts "$allowed_hosts"
