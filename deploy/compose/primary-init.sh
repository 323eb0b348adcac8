#!/bin/bash
# Run once by the postgres image's entrypoint on a new primary (docker-entrypoint-initdb.d):
# the app role and database pgmux serves, and a replication role for the replica service.
set -euo pipefail
psql -v ON_ERROR_STOP=1 -U postgres -d postgres <<'SQL'
SET password_encryption = 'scram-sha-256';
CREATE ROLE app LOGIN PASSWORD 'secret';
CREATE DATABASE app OWNER app;
CREATE ROLE replicator REPLICATION LOGIN PASSWORD 'replicator';
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
