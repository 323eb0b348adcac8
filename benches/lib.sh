# benches/lib.sh - shell helpers shared by benches/compare.sh, idle-memory.sh and
# instructions.sh (sourced, not run). The sourcing script sets BENCH (its name in messages),
# DIR (its state dir) and PGBIN before calling them.

log() { echo "[$BENCH] $*" >&2; }
die() { echo "[$BENCH] error: $*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

# PostgreSQL and PgBouncer refuse to run as root. runuser's PAM session may reset the
# open-file limit, so it is set again inside.
as_pg() {
  if is_root; then
    runuser -u postgres -- sh -c 'ulimit -n "$0" 2>/dev/null; exec "$@"' "$(ulimit -n)" "$@"
  else
    "$@"
  fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
  local p
  # below the ephemeral range (32768-60999 here): client sockets of other runs take ports there
  for p in $(shuf -i 20000-32000 -n 200); do
    port_in_use "$p" || { echo "$p"; return; }
  done
  die "no free port found"
}

# start_pg [postgresql.conf lines...]: a throwaway PostgreSQL in $DIR/pg on a free port
# (PG_PORT), socket in $DIR/run, log in $DIR/log; sets PG_STARTED=1 for stop_pg.
start_pg() {
  PG_PORT=$(free_port)
  as_pg "$PGBIN/initdb" -D "$DIR/pg" -U postgres -A trust -E UTF8 --no-locale --no-sync >/dev/null
  {
    echo "# ---- benches/$BENCH ----"
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $PG_PORT"
    echo "unix_socket_directories = '$DIR/run'"
    echo "fsync = off"
    printf '%s\n' "$@"
  } >> "$DIR/pg/postgresql.conf"
  as_pg "$PGBIN/pg_ctl" -D "$DIR/pg" -l "$DIR/log/postgres.log" -w -t 60 start >/dev/null \
    || die "PostgreSQL did not start; see $DIR/log/postgres.log"
  PG_STARTED=1
}

stop_pg() {
  [ "${PG_STARTED:-0}" = 1 ] && as_pg "$PGBIN/pg_ctl" -D "$DIR/pg" -m fast -w stop >/dev/null 2>&1
  PG_STARTED=0
}
