#!/usr/bin/env bash
# benches/compare.sh - pgmux against PgBouncer and direct PostgreSQL, side by side in one run
# (issue 6). On a fresh Debian machine it installs what is missing (PostgreSQL 15, pgbench,
# PgBouncer), starts a throwaway PostgreSQL 15, builds pgmux and pgmux-load in release, runs
# PgBouncer and pgmux on free ports (transaction mode, pool size 20, trust auth), and measures:
#
#   - pgbench -S at 50 and 500 clients and the default TPC-B-like script at 50 clients, against
#     direct, PgBouncer and pgmux (TPS, "without initial connection time");
#   - each proxy's CPU time (utime+stime from /proc/PID/stat) per 1,000 transactions, and
#     the user-space part of it (utime);
#   - each proxy's resident memory per idle client: VmRSS before and after pgmux-load opens
#     IDLE_CLIENTS idle connections (measured first, on fresh processes);
#   - p99 latency and TPS with BUSY_CLIENTS clients running pgmux-load's select workload for T
#     seconds through each proxy;
#
# then prints a table with the ratios pgmux/PgBouncer. Everything lives in $COMPARE_DIR and is
# removed at the end (KEEP=1 keeps it). All traffic stays on 127.0.0.1, or with SOCKETS=1 on
# this machine's Unix-domain sockets.
#
# Settings (environment):
#   T=15                 seconds per pgbench run
#   REPEAT=1             pgbench rounds (each runs every workload against all three in turn,
#                        the proxies' order alternating by round; before each TPC-B-like run
#                        the branches and tellers are vacuumed and the history emptied);
#                        TPS and CPU are the median of the rounds. On a 2-core machine one run
#                        differs from the next by up to ~15%: use 3 or more to compare
#   WORKLOADS="S50 SX50 SP50 S500 TPCB50"   which pgbench rows to run: -S at 50 clients in
#                        -M simple / extended / prepared, -S at 500, TPC-B-like at 50
#   IDLE_CLIENTS=0 and BUSY_CLIENTS=0 skip the memory and latency figures
#   JOBS=2               pgbench -j
#   SCALE=10             pgbench scale factor (1,000,000 accounts)
#   POOL_SIZE=20         server connections per pool, both proxies
#   IDLE_CLIENTS=5000    idle connections for the memory figure
#   BUSY_CLIENTS=10000   clients of the latency figure (0 skips it)
#   PG_MAX_CONNECTIONS=600  so the direct run at 500 clients can work (it is reported as
#                        failed if it does not)
#   COMPARE_DIR=/tmp/pgmux-compare   state dir (must not exist, or be one this script made)
#   PGBIN=/usr/lib/postgresql/15/bin
#   KEEP=0               1 keeps the dir, servers stopped
#   CARGO_BUILD_JOBS     honoured by cargo; 1 on small machines
#   PGMUX, LOAD          pgmux and pgmux-load binaries to use instead of building them
#   WORKERS=0            pgmux's `workers` (0: one thread per core; 1: a single thread, as
#                        PgBouncer runs)
#   SOCKETS=0            1: pgbench reaches PostgreSQL and both proxies through their Unix
#                        sockets, and both proxies reach PostgreSQL through its socket (the
#                        memory and busy-client rows stay on TCP: pgmux-load speaks TCP)
#   BATCH_SIZE=16        pgmux's `server_batch_size` (0: no batches)
#   SCHED_BATCH=true     pgmux's `sched_batch` (false: the default scheduling policy)
#   LOG_LEVEL=info       pgmux's log_level (the default configuration's; RUST_LOG overrides it)
#
# Usage: benches/compare.sh            (as root or a user that can run PostgreSQL; root runs
#                                       PostgreSQL and PgBouncer as `postgres`)
set -euo pipefail

T=${T:-15}
WORKERS=${WORKERS:-0}
BATCH_SIZE=${BATCH_SIZE:-16}
SOCKETS=${SOCKETS:-0}
REPEAT=${REPEAT:-1}
WORKLOADS=${WORKLOADS:-S50 SX50 SP50 S500 TPCB50}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
POOL_SIZE=${POOL_SIZE:-20}
IDLE_CLIENTS=${IDLE_CLIENTS:-5000}
BUSY_CLIENTS=${BUSY_CLIENTS:-10000}
MAX_CLIENTS=$(( (IDLE_CLIENTS > BUSY_CLIENTS ? IDLE_CLIENTS : BUSY_CLIENTS) + 1000 ))
PG_MAX_CONNECTIONS=${PG_MAX_CONNECTIONS:-600}
DIR=${COMPARE_DIR:-/tmp/pgmux-compare}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
KEEP=${KEEP:-0}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

BENCH=compare
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"

install_missing() {
  local pkgs=()
  [ -x "$PGBIN/postgres" ] || pkgs+=(postgresql-15)
  command -v pgbench >/dev/null || pkgs+=(postgresql-client-15)
  command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || pkgs+=(pgbouncer)
  [ ${#pkgs[@]} = 0 ] && return
  is_root || die "need root to apt-get install ${pkgs[*]}"
  log "installing ${pkgs[*]}"
  apt-get update -q
  # No service is started: policy-rc.d or the lack of systemd keeps Debian's pgbouncer off.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}"
}

PGMUX_PID="" BOUNCER_PID="" PG_STARTED=0
cleanup() {
  set +e
  [ -n "$PGMUX_PID" ] && kill -TERM "$PGMUX_PID" 2>/dev/null && wait "$PGMUX_PID" 2>/dev/null
  [ -n "$BOUNCER_PID" ] && kill -TERM "$BOUNCER_PID" 2>/dev/null
  stop_pg
  if [ "$KEEP" = 1 ]; then log "kept $DIR"; elif [ -f "$DIR/.pgmux-compare" ]; then rm -rf "$DIR"; fi
}

build() {
  if [ -n "${PGMUX:-}" ] && [ -n "${LOAD:-}" ]; then
    [ -x "$PGMUX" ] && [ -x "$LOAD" ] || die "PGMUX and LOAD must name executables"
    return
  fi
  log "building pgmux and pgmux-load (release)"
  local out
  out=$(cd "$REPO" && cargo build --release --bin pgmux --bin pgmux-load \
        --message-format=json-render-diagnostics | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
  PGMUX=$(grep '/pgmux$' <<<"$out" | tail -n 1)
  LOAD=$(grep '/pgmux-load$' <<<"$out" | tail -n 1)
  [ -x "$PGMUX" ] && [ -x "$LOAD" ] || die "cargo build did not produce pgmux and pgmux-load"
}

start_postgres() {
  start_pg "max_connections = $PG_MAX_CONNECTIONS" "shared_buffers = 256MB" \
    "synchronous_commit = off" "full_page_writes = off" "logging_collector = off"
  as_pg "$PGBIN/psql" -X -q -h "$DIR/run" -p "$PG_PORT" -U postgres -d postgres \
    -c "CREATE DATABASE bench" >/dev/null
  log "PostgreSQL on 127.0.0.1:$PG_PORT; pgbench -i -s $SCALE"
  pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres bench >"$DIR/log/init.log" 2>&1 \
    || die "pgbench -i failed; see $DIR/log/init.log"
}

wait_port() {  # wait_port PORT PID NAME LOG
  local deadline=$((SECONDS + 30))
  until port_in_use "$1"; do
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$4" >&2; die "$3 exited during startup"; }
    [ $SECONDS -lt $deadline ] || die "$3 not listening on $1 after 30 s; see $4"
    sleep 0.1
  done
}

# where the proxies reach PostgreSQL, and where pgbench reaches NAME (direct, pgbouncer, pgmux)
server_host() { if [ "$SOCKETS" = 1 ]; then echo "$DIR/run"; else echo 127.0.0.1; fi; }
sockets_or_empty() { if [ "$SOCKETS" = 1 ]; then echo "$1"; fi; }
client_host() {
  [ "$SOCKETS" = 1 ] || { echo 127.0.0.1; return; }
  case $1 in direct) echo "$DIR/run";; pgbouncer) echo "$DIR/bouncer";; pgmux) echo "$DIR/mux";; esac
}

start_pgbouncer() {
  BOUNCER_PORT=$(free_port)
  echo '"postgres" ""' > "$DIR/bouncer/userlist.txt"
  cat > "$DIR/bouncer/pgbouncer.ini" <<EOF
[databases]
bench = host=$(server_host) port=$PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir = $(sockets_or_empty "$DIR/bouncer")
auth_type = trust
auth_file = $DIR/bouncer/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = $MAX_CLIENTS
log_connections = 0
log_disconnections = 0
logfile = $DIR/bouncer/pgbouncer.log
pidfile = $DIR/bouncer/pgbouncer.pid
EOF
  is_root && chown -R postgres: "$DIR/bouncer"
  as_pg pgbouncer -d "$DIR/bouncer/pgbouncer.ini"
  local deadline=$((SECONDS + 30))
  until [ -s "$DIR/bouncer/pgbouncer.pid" ]; do
    [ $SECONDS -lt $deadline ] || die "PgBouncer wrote no pid file; see $DIR/bouncer/pgbouncer.log"
    sleep 0.1
  done
  BOUNCER_PID=$(cat "$DIR/bouncer/pgbouncer.pid")
  wait_port "$BOUNCER_PORT" "$BOUNCER_PID" PgBouncer "$DIR/bouncer/pgbouncer.log"
  log "PgBouncer $(pgbouncer --version | head -n 1 | awk '{print $2}') (pid $BOUNCER_PID) on 127.0.0.1:$BOUNCER_PORT"
}

start_pgmux() {
  PGMUX_PORT=$(free_port)
  cat > "$DIR/pgmux.toml" <<EOF
[pgmux]
listen_addr = "127.0.0.1"
listen_port = $PGMUX_PORT
workers = $WORKERS
unix_socket_dir = "$(sockets_or_empty "$DIR/mux")"
pool_mode = "transaction"
default_pool_size = $POOL_SIZE
server_batch_size = $BATCH_SIZE
sched_batch = ${SCHED_BATCH:-true}
max_client_conn = $MAX_CLIENTS
auth_type = "trust"
log_level = "${LOG_LEVEL:-info}"
# as PgBouncer's log_connections = 0 and log_disconnections = 0 above
log_connections = false
log_disconnections = false
# no metrics listener: its default port may be taken by another pgmux on the machine
metrics_listen_port = 0

[[users]]
name = "postgres"

[[databases]]
name = "bench"
host = "$(server_host)"
port = $PG_PORT
EOF
  # In a session of its own, as PgBouncer's -d gives it and a service manager gives any
  # daemon. Linux groups the tasks of one session for CPU fairness (autogroup): left in this
  # script's session, pgmux would share one share of the CPU with pgbench and pgmux-load,
  # and PostgreSQL's backends (each a session of its own) would be scheduled around the
  # group, with stalls of 100 ms and more (docs/performance.md). This script runs without job
  # control, so setsid execs in place and $! is pgmux's pid.
  setsid "$PGMUX" --config "$DIR/pgmux.toml" </dev/null >>"$DIR/log/pgmux.log" 2>&1 &
  PGMUX_PID=$!
  wait_port "$PGMUX_PORT" "$PGMUX_PID" pgmux "$DIR/log/pgmux.log"
  # the session id is the 6th field of /proc/PID/stat (the 4th after the command name)
  [ "$(sed 's/.*) //' "/proc/$PGMUX_PID/stat" | awk '{print $4}')" = "$PGMUX_PID" ] \
    || die "pgmux (pid $PGMUX_PID) did not get a session of its own"
  log "pgmux (pid $PGMUX_PID) on 127.0.0.1:$PGMUX_PORT"
}

cpu_ticks() {  # "utime stime" of PID, in clock ticks (all threads)
  sed 's/.*) //' "/proc/$1/stat" | awk '{print $12, $13}'
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

declare -A TPS CPU USR RSS P99 BUSY
CLK_TCK=$(getconf CLK_TCK)

# run_pgbench NAME PORT PID KEY ARGS... : appends this run's TPS to TPS[KEY,NAME], and the
# proxy's CPU and user-space CPU (ms per 1,000 tx) to CPU[KEY,NAME] and USR[KEY,NAME]
run_pgbench() {
  local name=$1 port=$2 pid=$3 key=$4; shift 4
  local out="$DIR/log/pgbench-$key-$name.log" u0 s0 u1 s1 tx tps
  log "pgbench $* -T $T -j $JOBS -> $name"
  [ -n "$pid" ] && read -r u0 s0 < <(cpu_ticks "$pid")
  if pgbench -n -h "$(client_host "$name")" -p "$port" -U postgres -T "$T" -j "$JOBS" "$@" bench >"$out" 2>&1; then
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$out")
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    TPS[$key,$name]+="$(printf '%.0f' "${tps:-0}") "
    if [ -n "$pid" ] && [ "${tx:-0}" -gt 0 ]; then
      read -r u1 s1 < <(cpu_ticks "$pid")
      CPU[$key,$name]+="$(per_ktx $((u1 - u0 + s1 - s0)) "$tx") "
      USR[$key,$name]+="$(per_ktx $((u1 - u0)) "$tx") "
    fi
  else
    TPS[$key,$name]+="failed "
    log "  failed: $(grep -m1 -iE 'error|fatal' "$out" || tail -n 1 "$out")"
  fi
}

# fresh_tables KEY: before a run of the TPC-B-like workload, what pgbench does unless given
# -n (vacuum the branches and tellers, empty the history), so every run starts alike. Read-only
# workloads leave the tables as they are.
fresh_tables() {
  [ "$1" = TPCB50 ] || return 0
  as_pg "$PGBIN/psql" -X -q -h "$DIR/run" -p "$PG_PORT" -U postgres -d bench \
    -c "VACUUM pgbench_branches" -c "VACUUM pgbench_tellers" -c "TRUNCATE pgbench_history" >/dev/null
}

per_ktx() {  # per_ktx TICKS TX -> ms per 1,000 transactions
  awk -v d="$1" -v hz="$CLK_TCK" -v tx="$2" 'BEGIN {printf "%.1f", d * 1000 / hz / (tx / 1000)}'
}

median() {  # median FORMAT NUMBERS...: their median ("failed" if any run failed, "" for none)
  local f=$1; shift
  [ $# = 0 ] && return
  case " $* " in *" failed "*) echo failed; return;; esac
  printf '%s\n' "$@" | sort -g | awk -v f="$f" '{v[NR] = $1}
    END {printf f, (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# settle: every per-run list becomes its median
settle() {
  local k
  # each round's figures first, so a median can be told from the spread behind it
  for k in $(printf '%s\n' "${!TPS[@]}" | sort); do
    log "rounds $k: TPS ${TPS[$k]}| CPU ${CPU[$k]:-- }| user ${USR[$k]:-- }"
  done
  for k in "${!TPS[@]}"; do TPS[$k]=$(median %.0f ${TPS[$k]}); done
  for k in "${!CPU[@]}"; do CPU[$k]=$(median %.1f ${CPU[$k]}); done
  for k in "${!USR[@]}"; do USR[$k]=$(median %.1f ${USR[$k]}); done
}

# idle_memory NAME PORT PID: RSS[NAME] in KiB per idle client
idle_memory() {
  local name=$1 port=$2 pid=$3 before after ready="$DIR/ready-$1" made
  before=$(rss_kib "$pid")
  log "$IDLE_CLIENTS idle clients -> $name (VmRSS before: $before KiB)"
  "$LOAD" --host 127.0.0.1 --port "$port" -U postgres -d bench -c "$IDLE_CLIENTS" \
    --duration 120 --hold 3 --ready-file "$ready" --quiet --json \
    >"$DIR/log/idle-$name.json" 2>"$DIR/log/idle-$name.log" &
  local load_pid=$! deadline=$((SECONDS + 120))
  until [ -f "$ready" ]; do
    kill -0 "$load_pid" 2>/dev/null || break
    [ $SECONDS -lt $deadline ] || break
    sleep 0.2
  done
  after=$(rss_kib "$pid")
  made=$(cat "$ready" 2>/dev/null || echo 0)
  wait "$load_pid" || log "  pgmux-load failed or counted errors; see $DIR/log/idle-$name.log"
  if [ "${made:-0}" -gt 0 ]; then
    RSS[$name]=$(awk -v a="$after" -v b="$before" -v n="$made" 'BEGIN {printf "%.2f", (a - b) / n}')
    log "  $made open, VmRSS after: $after KiB"
  else
    RSS[$name]=failed
  fi
}

# busy_latency NAME PORT: P99[NAME] (ms) and BUSY[NAME] (TPS) of BUSY_CLIENTS select clients
busy_latency() {
  local name=$1 port=$2 out="$DIR/log/busy-$1.json" line errors rc=0
  log "$BUSY_CLIENTS busy clients (pgmux-load -w select -T $T) -> $name"
  "$LOAD" --host 127.0.0.1 --port "$port" -U postgres -d bench -c "$BUSY_CLIENTS" -w select \
    --duration "$T" --json --quiet >"$out" 2>"$DIR/log/busy-$name.log" || rc=$?
  # 2: the run completed with errors, which are shown beside the figures
  if [ "$rc" = 0 ] || [ "$rc" = 2 ]; then
    line=$(tail -n 1 "$out")
    P99[$name]=$(sed -n 's/.*"latency_us":{[^}]*"p99":\([0-9]*\).*/\1/p' <<<"$line" \
      | awk '{printf "%.1f", $1 / 1000}')
    BUSY[$name]=$(sed -n 's/.*"tps":\([0-9.]*\).*/\1/p' <<<"$line" | awk '{printf "%.0f", $1}')
    errors=$(sed -n 's/.*"errors":\([0-9]*\).*/\1/p' <<<"$line")
    [ "${errors:-0}" = 0 ] || { P99[$name]="${P99[$name]} ($errors errors)"; }
  else
    P99[$name]=failed BUSY[$name]=failed
    log "  failed; see $DIR/log/busy-$name.log"
  fi
}

ratio() {  # ratio A B -> A/B with 2 decimals, or -
  awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2fx", a / b; else print "-" }'
}

label() {  # label KEY -> the workload's name in the table
  case $1 in
    S50) echo "pgbench -S, 50 clients";;
    SX50) echo "pgbench -S -M extended, 50 clients";;
    SP50) echo "pgbench -S -M prepared, 50 clients";;
    S500) echo "pgbench -S, 500 clients";;
    TPCB50) echo "TPC-B-like, 50 clients";;
    *) die "unknown workload $1";;
  esac
}

args_of() {  # args_of KEY -> pgbench arguments
  case $1 in
    S50) echo "-S -c 50";;
    SX50) echo "-S -M extended -c 50";;
    SP50) echo "-S -M prepared -c 50";;
    S500) echo "-S -c 500";;
    TPCB50) echo "-c 50";;
    *) die "unknown workload $1";;
  esac
}

print_table() {
  local k label
  echo
  echo "pgmux vs PgBouncer $(pgbouncer --version | head -n 1 | awk '{print $2}') vs direct PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'):" \
       "pgbench -T $T -j $JOBS (median of $REPEAT round(s)), scale $SCALE, transaction mode, pool size $POOL_SIZE, $(nproc) cores," \
       "$([ "$SOCKETS" = 1 ] && echo "Unix sockets" || echo "TCP on 127.0.0.1"), pgmux workers = $WORKERS, sched_batch = ${SCHED_BATCH:-true}"
  echo
  echo "| workload | direct | PgBouncer | pgmux | pgmux/PgBouncer |"
  echo "|---|---|---|---|---|"
  for k in $WORKLOADS; do
    echo "| $(label "$k") (TPS) | ${TPS[$k,direct]} | ${TPS[$k,pgbouncer]} | ${TPS[$k,pgmux]} | $(ratio "${TPS[$k,pgmux]}" "${TPS[$k,pgbouncer]}") |"
  done
  for k in $WORKLOADS; do
    echo "| proxy CPU per 1,000 tx, $(label "$k") (ms) | - | ${CPU[$k,pgbouncer]:--} | ${CPU[$k,pgmux]:--} | $(ratio "${CPU[$k,pgmux]:-}" "${CPU[$k,pgbouncer]:-}") |"
  done
  for k in $WORKLOADS; do
    echo "| of which user space, $(label "$k") (ms) | - | ${USR[$k,pgbouncer]:--} | ${USR[$k,pgmux]:--} | $(ratio "${USR[$k,pgmux]:-}" "${USR[$k,pgbouncer]:-}") |"
  done
  if [ "$IDLE_CLIENTS" -gt 0 ]; then
    echo "| resident memory per idle client, $IDLE_CLIENTS idle (KiB) | - | ${RSS[pgbouncer]} | ${RSS[pgmux]} | $(ratio "${RSS[pgmux]}" "${RSS[pgbouncer]}") |"
  fi
  if [ "$BUSY_CLIENTS" -gt 0 ]; then
    echo "| pgmux-load select, $BUSY_CLIENTS busy clients (TPS) | - | ${BUSY[pgbouncer]} | ${BUSY[pgmux]} | $(ratio "${BUSY[pgmux]}" "${BUSY[pgbouncer]}") |"
    echo "| pgmux-load select, $BUSY_CLIENTS busy clients: p99 latency (ms) | - | ${P99[pgbouncer]} | ${P99[pgmux]} | $(ratio "${P99[pgmux]}" "${P99[pgbouncer]}") |"
  fi
}

main() {
  install_missing
  command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs"
  if [ -e "$DIR" ] && [ ! -f "$DIR/.pgmux-compare" ]; then
    die "$DIR exists and was not made by this script; set COMPARE_DIR"
  fi
  build
  ulimit -n "$(ulimit -Hn)"
  [ "$(ulimit -n)" -ge "$MAX_CLIENTS" ] \
    || die "open-file limit $(ulimit -n) is too small for $((MAX_CLIENTS - 1000)) clients"
  rm -rf "$DIR"
  mkdir -p "$DIR/run" "$DIR/log" "$DIR/bouncer" "$DIR/mux"
  touch "$DIR/.pgmux-compare"
  is_root && chown postgres: "$DIR" "$DIR/run" "$DIR/log"
  trap cleanup EXIT
  cd /  # tools run as postgres must not inherit an unreadable working directory

  start_postgres
  start_pgbouncer
  start_pgmux

  # Memory first, on fresh processes: after pgbench their allocators hold freed memory that
  # idle clients would reuse unseen.
  if [ "$IDLE_CLIENTS" -gt 0 ]; then
    idle_memory pgbouncer "$BOUNCER_PORT" "$BOUNCER_PID"
    idle_memory pgmux "$PGMUX_PORT" "$PGMUX_PID"
  fi

  local k args r
  for r in $(seq "$REPEAT"); do
    for k in $WORKLOADS; do
      read -r -a args <<<"$(args_of "$k")"
      fresh_tables "$k"
      run_pgbench direct "$PG_PORT" "" "$k" "${args[@]}"
      # The two proxies take turns going first: a write workload slows as it runs (dead
      # rows), so whoever always went second would always be measured on the worse tables.
      if [ $((r % 2)) = 1 ]; then
        fresh_tables "$k"
        run_pgbench pgbouncer "$BOUNCER_PORT" "$BOUNCER_PID" "$k" "${args[@]}"
        fresh_tables "$k"
        run_pgbench pgmux "$PGMUX_PORT" "$PGMUX_PID" "$k" "${args[@]}"
      else
        fresh_tables "$k"
        run_pgbench pgmux "$PGMUX_PORT" "$PGMUX_PID" "$k" "${args[@]}"
        fresh_tables "$k"
        run_pgbench pgbouncer "$BOUNCER_PORT" "$BOUNCER_PID" "$k" "${args[@]}"
      fi
    done
  done
  settle
  if [ "$BUSY_CLIENTS" -gt 0 ]; then
    busy_latency pgbouncer "$BOUNCER_PORT"
    busy_latency pgmux "$PGMUX_PORT"
  fi
  print_table | tee "$DIR/table.md"
  if [ "$KEEP" = 1 ]; then log "logs and table in $DIR"; fi
}

main "$@"
