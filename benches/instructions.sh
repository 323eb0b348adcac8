#!/usr/bin/env bash
# benches/instructions.sh - pgmux's user-space instructions per transaction (issue 6), counted
# by valgrind's callgrind, which repeats to within a fraction of a percent from run to run
# where CPU time on a shared 2-core machine moves by tens of percent. Kernel time (most of a
# proxy's CPU, see docs/performance.md) is not counted.
#
# Starts a throwaway PostgreSQL 15 and runs pgmux (transaction mode, pool size 20, trust auth,
# default log level) under callgrind twice, with pgbench -S -t SMALL and -t LARGE per client,
# and prints (instructions of the large run - instructions of the small run) / (extra
# transactions): startup, logins and shutdown cancel out.
#
# Settings (environment):
#   CLIENTS=10 SMALL=100 LARGE=1100   pgbench -c and the two -t
#   PGBENCH_ARGS="-S"                 the workload (e.g. "-S -M extended", or "" for TPC-B)
#   PGMUX                             binary (default: cargo build --release)
#   WORKERS=0                         pgmux's `workers` (1: one thread, as compare.sh WORKERS=1)
#   BATCH_SIZE=16                     pgmux's server_batch_size (batches form only when
#                                     CLIENTS outnumber the pool's 20 servers)
#   PROXY=pgmux                       or pgbouncer: the same count for PgBouncer (Debian's
#                                     /usr/sbin/pgbouncer, pool 20, transaction mode, trust,
#                                     run as `postgres`), for the comparison
#   DIR=/tmp/pgmux-instructions       state dir, removed at the end (KEEP=1 keeps it)
#   PGBIN=/usr/lib/postgresql/15/bin
#
# Usage: benches/instructions.sh    (as root: PostgreSQL runs as `postgres`; needs valgrind)
set -euo pipefail

CLIENTS=${CLIENTS:-10}
SMALL=${SMALL:-100}
LARGE=${LARGE:-1100}
PGBENCH_ARGS=${PGBENCH_ARGS--S}
DIR=${DIR:-/tmp/pgmux-instructions}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
KEEP=${KEEP:-0}
BATCH_SIZE=${BATCH_SIZE:-16}
WORKERS=${WORKERS:-0}
PROXY=${PROXY:-pgmux}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

BENCH=instructions
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"

PG_STARTED=0 VG_PID=""
cleanup() {
  set +e
  [ -n "$VG_PID" ] && kill -INT "$VG_PID" 2>/dev/null && wait "$VG_PID" 2>/dev/null
  stop_pg
  if [ "$KEEP" = 1 ]; then log "kept $DIR"; elif [ -f "$DIR/.pgmux-instructions" ]; then rm -rf "$DIR"; fi
}

command -v valgrind >/dev/null || die "valgrind not found (apt-get install valgrind)"
command -v pgbench >/dev/null || die "pgbench not found (apt-get install postgresql-client-15)"
case "$PROXY" in
  pgmux) ;;
  pgbouncer)
    PGMUX=${PGBOUNCER:-/usr/sbin/pgbouncer}
    command -v setpriv >/dev/null || die "setpriv not found (util-linux)" ;;
  *) die "PROXY must be pgmux or pgbouncer" ;;
esac
if [ -z "${PGMUX:-}" ]; then
  log "building pgmux (release)"
  PGMUX=$(cd "$REPO" && cargo build --release --bin pgmux --message-format=json-render-diagnostics \
          | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | grep '/pgmux$' | tail -n 1)
fi
[ -x "$PGMUX" ] || die "no pgmux binary"
[ -e "$DIR" ] && [ ! -f "$DIR/.pgmux-instructions" ] && die "$DIR exists and was not made by this script"
rm -rf "$DIR"
mkdir -p "$DIR/run" "$DIR/log"
touch "$DIR/.pgmux-instructions"
[ "$(id -u)" = 0 ] && chown postgres: "$DIR" "$DIR/run" "$DIR/log"
trap cleanup EXIT
cd /

start_pg
pgbench -i -q -s 1 -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$DIR/log/init.log" 2>&1 \
  || die "pgbench -i failed; see $DIR/log/init.log"

PGMUX_PORT=$(free_port)
cat > "$DIR/pgmux.toml" <<EOF
[pgmux]
listen_addr = "127.0.0.1"
listen_port = $PGMUX_PORT
pool_mode = "transaction"
default_pool_size = 20
server_batch_size = $BATCH_SIZE
workers = $WORKERS
auth_type = "trust"
metrics_listen_port = 0

[[users]]
name = "postgres"

[[databases]]
name = "postgres"
host = "127.0.0.1"
port = $PG_PORT
EOF
cat > "$DIR/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGMUX_PORT
unix_socket_dir =
auth_type = trust
auth_file = $DIR/users.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 1000
logfile = $DIR/log/pgbouncer.log
EOF
echo '"postgres" ""' > "$DIR/users.txt"
[ "$(id -u)" = 0 ] && chown postgres: "$DIR/pgbouncer.ini" "$DIR/users.txt"

# proxy CMD...: runs as the proxy under CMD, in place of the (background) subshell, so its PID
# is the one signalled (PgBouncer refuses to run as root)
proxy() {
  if [ "$PROXY" = pgmux ]; then
    exec "$@" "$PGMUX" --config "$DIR/pgmux.toml"
  elif [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$@" "$PGMUX" "$DIR/pgbouncer.ini"
  else
    exec "$@" "$PGMUX" "$DIR/pgbouncer.ini"
  fi
}

# instructions TX: total instructions of a pgmux that served CLIENTS x TX transactions
instructions() {
  local out="$DIR/callgrind.$1"
  proxy valgrind --tool=callgrind --callgrind-out-file="$out" \
    </dev/null >"$DIR/log/pgmux.$1.log" 2>&1 &
  VG_PID=$!
  local deadline=$((SECONDS + 60))
  until port_in_use "$PGMUX_PORT"; do
    kill -0 "$VG_PID" 2>/dev/null || die "pgmux exited; see $DIR/log/pgmux.$1.log"
    [ $SECONDS -lt $deadline ] || die "pgmux not listening after 60 s"
    sleep 0.2
  done
  read -r -a args <<<"$PGBENCH_ARGS"
  pgbench -n -h 127.0.0.1 -p "$PGMUX_PORT" -U postgres -c "$CLIENTS" -j 1 -t "$1" "${args[@]}" \
    postgres >"$DIR/log/pgbench.$1.log" 2>&1 || die "pgbench failed; see $DIR/log/pgbench.$1.log"
  kill -INT "$VG_PID"
  wait "$VG_PID" || true
  VG_PID=""
  sed -n 's/^summary: \([0-9]*\)$/\1/p' "$out"
}

small=$(instructions "$SMALL")
large=$(instructions "$LARGE")
[ -n "$small" ] && [ -n "$large" ] || die "no callgrind summary; see $DIR/log"
awk -v a="$small" -v b="$large" -v n=$(( CLIENTS * (LARGE - SMALL) )) -v w="pgbench $PGBENCH_ARGS" \
  -v p="$PROXY" 'BEGIN {printf p " user-space instructions per transaction (%s, callgrind): %.0f\n", w, (b - a) / n}'
