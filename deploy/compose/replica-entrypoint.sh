#!/bin/bash
# Entrypoint of the compose replica: clone the primary with pg_basebackup on first start
# (standby.signal and primary_conninfo written by -R), then run the image's own entrypoint,
# which starts PostgreSQL on the existing data directory.
set -euo pipefail
: "${PGDATA:=/var/lib/postgresql/data}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  chown postgres: "$PGDATA"
  chmod 700 "$PGDATA"
  until gosu postgres pg_basebackup -h primary -U replicator -D "$PGDATA" -R -X stream \
      -C -S replica1 --no-password; do
    echo "replica: waiting for the primary" >&2
    sleep 2
  done
fi
exec docker-entrypoint.sh postgres
