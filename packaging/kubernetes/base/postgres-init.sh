#!/bin/bash
# Runs once, when the official postgres image initialises an empty data directory: the
# agent's role (REPLICATION only) with its password from the mounted Secret.
set -euo pipefail
password=$(cat /var/run/secrets/pg/password)
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  --set=pw="$password" <<'SQL'
CREATE ROLE replicator WITH LOGIN REPLICATION PASSWORD :'pw';
SQL
# Replication connections from the sidecar (127.0.0.1) with a SCRAM password.
sed -i '1i host replication replicator 127.0.0.1/32 scram-sha-256' "$PGDATA/pg_hba.conf"
