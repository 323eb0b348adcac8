#!/usr/bin/env bash
# benches/idle-memory.sh - resident memory per idle client of pgmux (issue 6), alone and quick.
# Starts a throwaway PostgreSQL 15 and one fresh pgmux (transaction mode, trust auth), opens
# CLIENTS idle connections with pgmux-load, and prints (VmRSS after - VmRSS before) / clients,
# the way benches/compare.sh measures it. Builds pgmux and pgmux-load in release first unless
# PGMUX and LOAD name binaries.
#
# Settings (environment):
#   CLIENTS=10000        idle connections (split over PROCESSES and SOURCE_ADDRS)
#   PROCESSES=1          pgmux-load --processes
#   SOURCE_ADDRS=        pgmux-load --source-addrs (e.g. 127.0.0.2,127.0.0.3)
#   RATE=0               pgmux-load --rate (0: as fast as it can)
#   POOL_MODE=transaction
#   LOG_LEVEL=info       pgmux's log_level (info is the default configuration's)
#   EXTRA=               more lines for pgmux's [pgmux] section
#   LOAD_ARGS=           instead of holding the clients idle, run this pgmux-load workload
#                        (e.g. "--sql FILE --scale 1 -T 30"); the summary is printed
#   PGMUX, LOAD          binaries (default: cargo build --release)
#   DIR=/tmp/pgmux-idle-memory   state dir, removed at the end (KEEP=1 keeps it)
#   PGBIN=/usr/lib/postgresql/15/bin
#
# Usage: benches/idle-memory.sh     (as root: PostgreSQL runs as `postgres`)
set -euo pipefail

CLIENTS=${CLIENTS:-10000}
PROCESSES=${PROCESSES:-1}
SOURCE_ADDRS=${SOURCE_ADDRS:-}
RATE=${RATE:-0}
POOL_MODE=${POOL_MODE:-transaction}
EXTRA=${EXTRA:-}
LOG_LEVEL=${LOG_LEVEL:-info}
DIR=${DIR:-/tmp/pgmux-idle-memory}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
KEEP=${KEEP:-0}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

BENCH=idle-memory
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

PGMUX_PID="" PG_STARTED=0
cleanup() {
  set +e
  [ -n "$PGMUX_PID" ] && kill -TERM "$PGMUX_PID" 2>/dev/null && wait "$PGMUX_PID" 2>/dev/null
  stop_pg
  if [ "$KEEP" = 1 ]; then log "kept $DIR"; elif [ -f "$DIR/.pgmux-idle-memory" ]; then rm -rf "$DIR"; fi
}

if [ -z "${PGMUX:-}" ] || [ -z "${LOAD:-}" ]; then
  log "building pgmux and pgmux-load (release)"
  out=$(cd "$REPO" && cargo build --release --bin pgmux --bin pgmux-load \
        --message-format=json-render-diagnostics | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
  PGMUX=$(grep '/pgmux$' <<<"$out" | tail -n 1)
  LOAD=$(grep '/pgmux-load$' <<<"$out" | tail -n 1)
fi
[ -x "$PGMUX" ] && [ -x "$LOAD" ] || die "no pgmux and pgmux-load binaries"
[ -e "$DIR" ] && [ ! -f "$DIR/.pgmux-idle-memory" ] && die "$DIR exists and was not made by this script"
ulimit -n "$(ulimit -Hn)"
rm -rf "$DIR"
mkdir -p "$DIR/run" "$DIR/log"
touch "$DIR/.pgmux-idle-memory"
[ "$(id -u)" = 0 ] && chown postgres: "$DIR" "$DIR/run" "$DIR/log"
trap cleanup EXIT
cd /

start_pg

PGMUX_PORT=$(free_port)
cat > "$DIR/pgmux.toml" <<EOF
[pgmux]
listen_addr = "127.0.0.1"
listen_port = $PGMUX_PORT
pool_mode = "$POOL_MODE"
default_pool_size = 20
max_client_conn = $((CLIENTS + 1000))
auth_type = "trust"
log_level = "$LOG_LEVEL"
metrics_listen_port = 0
$EXTRA

[[users]]
name = "postgres"

[[databases]]
name = "postgres"
host = "127.0.0.1"
port = $PG_PORT
EOF
"$PGMUX" --config "$DIR/pgmux.toml" </dev/null >>"$DIR/log/pgmux.log" 2>&1 &
PGMUX_PID=$!
deadline=$((SECONDS + 30))
until port_in_use "$PGMUX_PORT"; do
  kill -0 "$PGMUX_PID" 2>/dev/null || die "pgmux exited; see $DIR/log/pgmux.log"
  [ $SECONDS -lt $deadline ] || die "pgmux not listening after 30 s"
  sleep 0.1
done

before=$(rss_kib "$PGMUX_PID")
ready="$DIR/ready"
args=(--host 127.0.0.1 --port "$PGMUX_PORT" -U postgres -d postgres -c "$CLIENTS"
      --processes "$PROCESSES" --rate "$RATE" --ready-file "$ready" --quiet --json)
[ -n "$SOURCE_ADDRS" ] && args+=(--source-addrs "$SOURCE_ADDRS")
if [ -n "${LOAD_ARGS:-}" ]; then
  read -r -a extra <<<"$LOAD_ARGS"
  args+=("${extra[@]}")
  # server connections at peak, counted in PostgreSQL
  args+=(--direct "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" --server-dbname postgres)
else
  args+=(--duration 300 --hold 3)
fi
"$LOAD" "${args[@]}" >"$DIR/log/load.json" 2>"$DIR/log/load.log" &
load_pid=$!
deadline=$((SECONDS + 300))
until [ -f "$ready" ]; do
  kill -0 "$load_pid" 2>/dev/null || break
  [ $SECONDS -lt $deadline ] || break
  sleep 0.2
done
after=$(rss_kib "$PGMUX_PID")
made=$(cat "$ready" 2>/dev/null || echo 0)
wait "$load_pid" || log "pgmux-load failed or counted errors; see $DIR/log/load.log"
[ "${made:-0}" -gt 0 ] || die "no client connected; see $DIR/log/load.log"
if [ -n "${LOAD_ARGS:-}" ]; then
  echo "pgmux-load summary: $(tail -n 1 "$DIR/log/load.json")"
  echo "pgmux open files at the end: $(ls "/proc/$PGMUX_PID/fd" | wc -l)"
fi
what=idle
[ -n "${LOAD_ARGS:-}" ] && what=busy
log "pgmux VmRSS before: $before KiB, with $made $what clients: $after KiB"
awk -v a="$after" -v b="$before" -v n="$made" -v w="$what" \
  'BEGIN {printf "resident memory per %s client, %d %s: %.2f KiB\n", w, n, w, (a - b) / n}'
