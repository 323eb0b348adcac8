#!/usr/bin/env bash
# deploy/local/up.sh - the README quick start: build pgmux, start a throwaway PostgreSQL 15
# primary with 2 streaming replicas, and run pgmux in front of the primary and both replicas
# (writes to the primary, reads to the replicas). Everything lives in one directory; deploy/local/down.sh stops it all and removes that directory.
#
# Safe to re-run: a running cluster is reused, pgmux is rebuilt and restarted.
#
# Settings (environment):
#   PGMUX_LOCAL_DIR            state dir                    (default /tmp/pgmux-local)
#   PGMUX_LOCAL_PG_PORT        primary port; replicas +1,+2 (default 55432)
#   PGMUX_LOCAL_PORT           pgmux listen port            (default 6432)
#   PGMUX_LOCAL_CLUSTER_ONLY=1 skip building/starting pgmux, just the cluster
#   PGBIN                      PostgreSQL 15 server binaries (default /usr/lib/postgresql/15/bin)
#   CARGO_BUILD_JOBS           honoured by cargo; set to 1 on small machines
set -euo pipefail

DIR=${PGMUX_LOCAL_DIR:-/tmp/pgmux-local}
PG_PORT=${PGMUX_LOCAL_PG_PORT:-55432}
PGMUX_PORT=${PGMUX_LOCAL_PORT:-6432}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
NREPLICAS=2
PG_OS_USER=postgres
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

log() { echo "[up] $*" >&2; }
die() { echo "[up] error: $*" >&2; exit 1; }

# PostgreSQL refuses to run as root.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi; }

install_postgres() {
  [ -x "$PGBIN/postgres" ] && return
  log "PostgreSQL 15 not found in $PGBIN; installing it with apt-get"
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "need root (or sudo) to install postgresql-15"
    sudo=sudo
  fi
  command -v apt-get >/dev/null || die "no apt-get: install PostgreSQL 15 yourself and set PGBIN"
  $sudo apt-get update
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql-15 postgresql-client-15 \
    || die "apt-get could not install postgresql-15; on distributions that lack it, add the PGDG repository (https://apt.postgresql.org)"
  [ -x "$PGBIN/postgres" ] || die "postgresql-15 installed but $PGBIN/postgres is missing; set PGBIN"
}

build_pgmux() {
  command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs"
  log "building pgmux (cargo build --release)"
  # cargo reports the binary's real path, wherever CARGO_TARGET_DIR or config put it.
  PGMUX_BIN=$(cd "$REPO" && cargo build --release --bin pgmux --message-format=json-render-diagnostics \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
  if [ -z "$PGMUX_BIN" ] || [ ! -x "$PGMUX_BIN" ]; then
    die "cargo build did not produce a pgmux binary"
  fi
}

psql_at() {  # psql_at PORT DB SQL
  as_pg "$PGBIN/psql" -X -q -A -t -h "$DIR/run" -p "$1" -U postgres -d "$2" -v ON_ERROR_STOP=1 -c "$3"
}

is_running() { [ -f "$1/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

start_instance() {  # start_instance DATADIR NAME
  if is_running "$1"; then log "$2 already running"; return; fi
  # -l and no pipes: the server would inherit a pipe and keep our caller waiting forever.
  as_pg "$PGBIN/pg_ctl" -D "$1" -l "$DIR/log/$2.log" -w -t 60 start >/dev/null \
    || die "$2 did not start; see $DIR/log/$2.log"
  log "$2 started"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_cluster() {
  if [ -d "$DIR" ] && [ ! -f "$DIR/.pgmux-local" ] && [ -n "$(ls -A "$DIR")" ]; then
    die "$DIR exists and was not created by up.sh; pick another PGMUX_LOCAL_DIR"
  fi
  mkdir -p "$DIR/run" "$DIR/log"
  # Marks the dir as ours, so down.sh never deletes a directory it did not create.
  touch "$DIR/.pgmux-local"
  chmod 700 "$DIR"
  if [ "$(id -u)" = 0 ]; then chown "$PG_OS_USER": "$DIR" "$DIR/run" "$DIR/log"; fi
  as_pg test -x "$DIR" || die "$PG_OS_USER cannot reach $DIR (a parent directory is not traversable); pick another PGMUX_LOCAL_DIR"

  local p=$DIR/primary
  if [ ! -f "$p/PG_VERSION" ]; then
    rm -rf "$p"
    as_pg "$PGBIN/initdb" -D "$p" -U postgres -A trust -E UTF8 --no-locale --no-sync >/dev/null
    # First match wins: app must do a real SCRAM exchange over TCP (as pgmux will), while the
    # superuser and replication stay password-less on this throwaway, localhost-only cluster.
    cat > "$p/pg_hba.conf" <<'EOF'
local   all          all                  trust
host    all          app   127.0.0.1/32   scram-sha-256
host    all          all   127.0.0.1/32   trust
host    replication  all   127.0.0.1/32   trust
EOF
    cat >> "$p/postgresql.conf" <<EOF

# ---- deploy/local/up.sh ----
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$DIR/run'
max_connections = 300
shared_buffers = 128MB
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
password_encryption = 'scram-sha-256'
cluster_name = 'primary'
logging_collector = off
EOF
    log "primary initialised"
  fi
  if ! is_running "$p" && port_in_use "$PG_PORT"; then
    die "port $PG_PORT is taken by something else; set PGMUX_LOCAL_PG_PORT"
  fi
  start_instance "$p" primary

  # Before any base backup, so the replicas are born with them.
  psql_at "$PG_PORT" postgres "DO \$\$BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') THEN CREATE ROLE app LOGIN; END IF;
    END\$\$"
  psql_at "$PG_PORT" postgres "SET password_encryption = 'scram-sha-256'; ALTER ROLE app LOGIN PASSWORD 'secret'"
  # pgmux's host monitor logs in as app: with this it sees a replica's timeline and keeps a
  # replica that follows an old primary away from reads (docs/routing.md)
  psql_at "$PG_PORT" postgres "GRANT pg_read_all_stats TO app"
  if [ "$(psql_at "$PG_PORT" postgres "SELECT count(*) FROM pg_database WHERE datname = 'app'")" = 0 ]; then
    psql_at "$PG_PORT" postgres "CREATE DATABASE app OWNER app"
  fi

  local i r port
  for i in $(seq 1 "$NREPLICAS"); do
    r=$DIR/replica$i; port=$((PG_PORT + i))
    if [ ! -f "$r/PG_VERSION" ]; then
      rm -rf "$r"
      # A slot left by an interrupted earlier run would make -C fail.
      psql_at "$PG_PORT" postgres "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                                   WHERE slot_name = 'replica$i' AND NOT active" >/dev/null
      as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PG_PORT" -U postgres -D "$r" \
        -R -X stream -C -S "replica$i" -c fast --no-sync >/dev/null
      printf "# ---- replica overrides ----\nport = %s\ncluster_name = 'replica%s'\n" "$port" "$i" \
        >> "$r/postgresql.conf"
      log "replica$i cloned"
    fi
    if ! is_running "$r" && port_in_use "$port"; then
      die "port $port is taken by something else; set PGMUX_LOCAL_PG_PORT"
    fi
    start_instance "$r" "replica$i"
  done

  local deadline=$((SECONDS + 60)) ok
  while :; do
    ok=1
    for i in $(seq 1 "$NREPLICAS"); do
      [ "$(psql_at $((PG_PORT + i)) postgres "SELECT pg_is_in_recovery() AND EXISTS
            (SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming')" 2>/dev/null)" = t ] || ok=0
    done
    [ $ok = 1 ] && break
    [ $SECONDS -lt $deadline ] || die "replicas not streaming after 60 s; see $DIR/log/"
    sleep 0.1
  done
  log "primary on 127.0.0.1:$PG_PORT, $NREPLICAS replicas streaming on $((PG_PORT + 1))-$((PG_PORT + NREPLICAS))"
}

write_config() {
  local replicas="" i
  for i in $(seq 1 "$NREPLICAS"); do
    replicas+="${replicas:+, }{ host = \"127.0.0.1\", port = $((PG_PORT + i)) }"
  done
  cat > "$DIR/pgmux.toml" <<EOF
# Written by deploy/local/up.sh; regenerated on every run.
[pgmux]
listen_addr = "127.0.0.1"
listen_port = $PGMUX_PORT
pool_mode = "transaction"
default_pool_size = 10
auth_type = "scram-sha-256"

[[users]]
name = "app"
password = "secret"

# Reads go to the replicas, writes to the primary; each client reads its own writes.
[[databases]]
name = "app"
host = "127.0.0.1"
port = $PG_PORT
read_write_split = true
replicas = [$replicas]

# The same database, replicas only (reporting, analytics).
[[databases]]
name = "app_ro"
dbname = "app"
host = "127.0.0.1"
port = $PG_PORT
route = "replica"
replicas = [$replicas]
EOF
  chmod 600 "$DIR/pgmux.toml"
}

pgmux_pid() {  # prints the pid of our running pgmux, if any
  local pid
  pid=$(cat "$DIR/pgmux.pid" 2>/dev/null) || return 1
  # A stale pid file may name an unrelated process by now.
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q pgmux \
    && echo "$pid"
}

start_pgmux() {
  local pid deadline
  if pid=$(pgmux_pid); then
    log "restarting pgmux (pid $pid) to pick up the fresh build and config"
    kill -TERM "$pid"
    deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null; do
      [ $SECONDS -lt $deadline ] || { kill -KILL "$pid" 2>/dev/null || true; break; }
      sleep 0.1
    done
  fi
  rm -f "$DIR/pgmux.pid"
  if port_in_use "$PGMUX_PORT"; then
    die "port $PGMUX_PORT is taken by something else; set PGMUX_LOCAL_PORT"
  fi

  # setsid: a Ctrl-C in this terminal later must not take pgmux down with it.
  RUST_LOG=${RUST_LOG:-info} setsid "$PGMUX_BIN" --config "$DIR/pgmux.toml" \
    </dev/null >>"$DIR/pgmux.log" 2>&1 &
  pid=$!
  echo "$pid" > "$DIR/pgmux.pid"
  deadline=$((SECONDS + 30))
  until port_in_use "$PGMUX_PORT"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$DIR/pgmux.log" >&2 || true
      die "pgmux exited during startup; log: $DIR/pgmux.log"
    fi
    [ $SECONDS -lt $deadline ] || die "pgmux not listening on $PGMUX_PORT after 30 s; log: $DIR/pgmux.log"
    sleep 0.1
  done
  log "pgmux (pid $pid) listening on 127.0.0.1:$PGMUX_PORT"
}

main() {
  install_postgres
  [ "${PGMUX_LOCAL_CLUSTER_ONLY:-0}" = 1 ] || build_pgmux
  # pg tools run as postgres and must not inherit an unreadable working directory.
  cd /
  start_cluster
  write_config

  local here
  here=$(dirname "${BASH_SOURCE[0]}")
  if [ "${PGMUX_LOCAL_CLUSTER_ONLY:-0}" = 1 ]; then
    log "PGMUX_LOCAL_CLUSTER_ONLY=1: pgmux not started (config: $DIR/pgmux.toml)"
  else
    start_pgmux
  fi
  cat <<EOF

Connect through pgmux:
  psql "host=127.0.0.1 port=$PGMUX_PORT user=app dbname=app password=secret"
Straight to PostgreSQL (primary, replicas on $((PG_PORT + 1))-$((PG_PORT + NREPLICAS))):
  psql "host=127.0.0.1 port=$PG_PORT user=app dbname=app password=secret"
Logs: $DIR/pgmux.log, $DIR/log/
Stop everything and delete $DIR:
  ${here}/down.sh
EOF
}

main "$@"
