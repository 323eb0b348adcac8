#!/usr/bin/env bash
# deploy/local/down.sh - undo deploy/local/up.sh: stop pgmux, stop the PostgreSQL replicas and
# primary, delete the state dir. Safe to run when nothing (or only part of it) is running.
#
# Settings (environment): PGMUX_LOCAL_DIR (default /tmp/pgmux-local), PGBIN (default
# /usr/lib/postgresql/15/bin) - the same as for up.sh.
set -euo pipefail

DIR=${PGMUX_LOCAL_DIR:-/tmp/pgmux-local}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PG_OS_USER=postgres

log() { echo "[down] $*" >&2; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi; }

if [ ! -e "$DIR" ]; then
  log "$DIR does not exist; nothing to do"
  exit 0
fi
# rm -rf on a directory up.sh did not create would be a disaster.
if [ ! -f "$DIR/.pgmux-local" ]; then
  log "$DIR was not created by up.sh (no .pgmux-local marker); refusing to touch it"
  exit 1
fi
cd /

pid=$(cat "$DIR/pgmux.pid" 2>/dev/null || true)
# A stale pid file may name an unrelated process by now.
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q pgmux; then
  kill -TERM "$pid"
  deadline=$((SECONDS + 15))
  while kill -0 "$pid" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      log "pgmux ignored SIGTERM for 15 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  log "pgmux (pid $pid) stopped"
else
  log "pgmux not running"
fi

# Replicas first, so their walreceivers do not spin on a vanished primary.
for d in "$DIR"/replica* "$DIR/primary"; do
  [ -f "$d/PG_VERSION" ] || continue
  if [ -f "$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$d" status >/dev/null 2>&1; then
    as_pg "$PGBIN/pg_ctl" -D "$d" -m fast -w -t 60 stop >/dev/null
    log "$(basename "$d") stopped"
  fi
done

rm -rf "$DIR"
log "removed $DIR"
