#!/usr/bin/env bash
# Runs one job on this TPU VM worker (launch/tpu.sh starts it on every worker at once):
#
#   bash launch/worker.sh --log-dir DIR [--gcs-logs gs://.../logs] [--slice S] -- CMD...
#
# * CMD's stdout + stderr go to DIR/worker-N.log (N = this worker's number in its slice, from the
#   TPU metadata server; SGT_WORKER_ID overrides it) and are copied to
#   GCS_LOGS/slice-S-worker-N.log every SGT_LOG_SYNC seconds (default 60) and at the end;
# * DIR/pid holds CMD's pid (launch/tpu.sh stop sends it SIGTERM; a SIGTERM to this script is
#   forwarded, so the trainer checkpoints and exits); DIR/exit_code is written when CMD ends;
# * refuses to start while a previous run of DIR is alive, and warns about any other process
#   holding the TPU (libtpu then fails with "TPU already in use").
set -uo pipefail

LOG_DIR=""
GCS_LOGS=""
SLICE=0
while (($#)); do
  case $1 in
    --log-dir) LOG_DIR=$2; shift 2 ;;
    --gcs-logs) GCS_LOGS=$2; shift 2 ;;
    --slice) SLICE=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "worker.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n $LOG_DIR && $# -gt 0 ]] || { echo "usage: worker.sh --log-dir DIR [--gcs-logs URL] [--slice S] -- CMD..." >&2; exit 2; }

metadata() {
  curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1" 2>/dev/null
}

WORKER_ID=${SGT_WORKER_ID:-$(metadata agent-worker-number || echo 0)}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/worker-$WORKER_ID.log"
PID_FILE="$LOG_DIR/pid"

if [[ -f $PID_FILE ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  echo "worker.sh: a run is still active in $LOG_DIR (pid $(cat "$PID_FILE")); launch/tpu.sh stop first" >&2
  exit 3
fi
if [[ -e /dev/accel0 ]] && command -v lsof >/dev/null; then
  holders=$(sudo -n lsof -t -w /dev/accel0 2>/dev/null | tr '\n' ' ' || true)
  [[ -z $holders ]] || echo "worker.sh: warning: processes $holders hold /dev/accel0 (a stale run?)" >&2
fi
rm -f "$LOG_DIR/exit_code"

sync_log() {
  [[ -n $GCS_LOGS ]] || return 0
  gcloud storage cp "$LOG" "$GCS_LOGS/slice-$SLICE-worker-$WORKER_ID.log" >/dev/null 2>&1 || true
}

{
  echo "=== $(date -u +%FT%TZ) $(hostname) slice $SLICE worker $WORKER_ID: $*"
  env | grep -E '^(JAX_|MEGASCALE_|LIBTPU_|XLA_|TPU_|SGT_)' | sort
} >>"$LOG"

"$@" >>"$LOG" 2>&1 &
JOB=$!
echo "$JOB" >"$PID_FILE"
trap 'kill -TERM "$JOB" 2>/dev/null' TERM INT

(
  while kill -0 "$JOB" 2>/dev/null; do
    sleep "${SGT_LOG_SYNC:-60}"
    sync_log
  done
) &
SYNCER=$!

code=0
wait "$JOB" || code=$?
while kill -0 "$JOB" 2>/dev/null; do   # woken by the trap: wait for the job's own exit
  wait "$JOB" || code=$?
done
kill "$SYNCER" 2>/dev/null
wait "$SYNCER" 2>/dev/null
echo "=== $(date -u +%FT%TZ) exit $code" >>"$LOG"
echo "$code" >"$LOG_DIR/exit_code"
rm -f "$PID_FILE"
sync_log
exit "$code"
