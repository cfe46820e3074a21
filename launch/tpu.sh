#!/usr/bin/env bash
# sgt-jax on Cloud TPU VMs: create, set up, run on every worker, watch, restart on preemption, delete.
#
#   launch/tpu.sh [options] COMMAND [-- ARGS...]
#
# Commands
#   create          create the TPU VM (or a queued resource: --queued, always for several slices)
#   setup           on every worker: Python 3.11 venv, this repo's committed code (HEAD, via GCS),
#                   requirements.txt + requirements-tpu.txt (jax[tpu], libtpu) pinned; then check
#                   that every host has identical versions
#   run -- CMD...   run CMD on every worker at once (detached): environment, the jax.distributed
#                   coordinator, logs to LOG_DIR/worker-N.log and copied to WORKDIR/logs/
#   train [-- K=V]  run the trainer: python -m sgt_jax.train --config CONFIG --workdir WORKDIR
#                   [--config.K=V ...]
#   babysit [-- K=V] keep training until it finishes: (re)create a missing / preempted TPU, set it
#                   up, start `train`, poll every worker's exit code; a worker that fails stops
#                   the job on all workers and restarts it; the trainer resumes from the last
#                   checkpoint in WORKDIR
#   logs            tail -F the log of --worker N (default 0)
#   status          the TPU's (or queued resource's) state and every worker's exit code of the last run
#   stop            SIGTERM the run on every worker (the trainer checkpoints, then exits)
#   delete          delete the TPU VM / queued resource
#   ssh             interactive shell on --worker N
#
# Options (each also settable by the environment variable in brackets; --env FILE sources a file)
#   --name NAME            TPU / queued-resource name            [TPU_NAME]
#   --project P --zone Z                                          [PROJECT, ZONE]
#   --accelerator TYPE     v5p-64, v6e-64, v5litepod-16, v4-32, 2xv5p-64 (2 slices)  [ACCELERATOR]
#   --runtime VERSION      TPU VM image (default per family)     [RUNTIME_VERSION]
#   --bucket gs://B        code, logs and runs live here         [BUCKET]
#   --run NAME             run name (default: TPU name)          [RUN_NAME]
#   --workdir URL          default BUCKET/runs/RUN_NAME          [WORKDIR]
#   --config FILE          default configs/sgt_bagel_7b.py      [CONFIG]
#   --spot | --reserved    capacity type                          [SPOT=1, RESERVED=1]
#   --queued               create through a queued resource       [QUEUED=1]
#   --worker N --slice S   for logs / ssh (default worker 0 of slice 0)
#   --set-env K=V          extra environment for the job (repeatable), e.g. LIBTPU_INIT_ARGS=...
#   --xla-cache URL        JAX's persistent compilation cache, shared by the workers and reused
#                          by restarts (default WORKDIR/xla_cache; '' turns it off)  [XLA_CACHE]
#   --coordinator-port P   jax.distributed coordinator port (default 8476: the port the TPU
#                          firewall rule opens; jax >= 0.8.1 would otherwise use 8482) [COORDINATOR_PORT]
#   --max-restarts N       babysit: give up after N failed runs on a healthy TPU (default 5)
#   --poll SECONDS         babysit / create: polling period (default 60)
#   --dry-run              print every command (gcloud, git, ...) instead of running it  [SGT_DRY_RUN=1]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"
exec 3>&1                # dry-run prints commands here, even from inside $(...)
SGT_SHOW_FD=3

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

WORKER=0
SLICE=0
MAX_RESTARTS=${MAX_RESTARTS:-5}
POLL=${POLL:-60}
JOB_ENV=()
COMMAND=""
ARGS=()
while (($#)); do
  case $1 in
    --env) # shellcheck disable=SC1090
      source "$2"; shift 2 ;;
    --name) TPU_NAME=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --accelerator) ACCELERATOR=$2; shift 2 ;;
    --runtime) RUNTIME_VERSION=$2; shift 2 ;;
    --bucket) BUCKET=$2; shift 2 ;;
    --run) RUN_NAME=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --worker) WORKER=$2; shift 2 ;;
    --slice) SLICE=$2; shift 2 ;;
    --set-env) JOB_ENV+=("$2"); shift 2 ;;
    --xla-cache) XLA_CACHE=$2; shift 2 ;;
    --coordinator-port) COORDINATOR_PORT=$2; shift 2 ;;
    --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
    --poll) POLL=$2; shift 2 ;;
    --dry-run) SGT_DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; ARGS=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) if [[ -z $COMMAND ]]; then COMMAND=$1; shift; else die "unexpected argument '$1' (job arguments go after --)"; fi ;;
  esac
done
[[ -n $COMMAND ]] || usage 1

: "${TPU_NAME:?set --name or TPU_NAME}"
: "${ZONE:?set --zone or ZONE}"
: "${ACCELERATOR:?set --accelerator or ACCELERATOR (e.g. v5p-64)}"
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
RESERVED=${RESERVED:-0}
SLICES=$(num_slices "$ACCELERATOR")
SLICE_TYPE=$(slice_type "$ACCELERATOR")
HOSTS=$(hosts_per_slice "$ACCELERATOR")
RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR")}
QUEUED=${QUEUED:-0}
((SLICES == 1)) || QUEUED=1            # several slices: one queued resource with --node-count
RUN_NAME=${RUN_NAME:-$TPU_NAME}
BUCKET=${BUCKET:-}
BUCKET=${BUCKET%/}
WORKDIR=${WORKDIR:-${BUCKET:+$BUCKET/runs/$RUN_NAME}}
CONFIG=${CONFIG:-configs/sgt_bagel_7b.py}
COORDINATOR_PORT=${COORDINATOR_PORT:-8476}
# shellcheck disable=SC2088  # the tildes are expanded by the workers' shells
REMOTE_DIR='~/sgt-jax'
# shellcheck disable=SC2088
VENV='~/sgt-venv'
# shellcheck disable=SC2088
LOG_DIR="~/sgt-logs/$RUN_NAME"

GCLOUD=(gcloud)
[[ -z $PROJECT ]] || GCLOUD+=(--project "$PROJECT")
TPUVM=("${GCLOUD[@]}" compute tpus tpu-vm)
QR=("${GCLOUD[@]}" compute tpus queued-resources)

# node names: one per slice
nodes() {
  if ((SLICES == 1)); then printf '%s\n' "$TPU_NAME"
  else local i; for ((i = 0; i < SLICES; i++)); do printf '%s\n' "$TPU_NAME-$i"; done; fi
}

need_bucket() { [[ -n $BUCKET ]] || die "set --bucket gs://BUCKET (code, logs and checkpoints live there)"; }

ssh_cmd() {  # ssh_cmd NODE WORKER REMOTE_COMMAND
  run "${TPUVM[@]}" ssh "$1" --zone "$ZONE" --worker="$2" --command "$3"
}

ssh_query() {  # ssh_query PLACEHOLDER NODE WORKER REMOTE_COMMAND
  query "$1" "${TPUVM[@]}" ssh "$2" --zone "$ZONE" --worker="$3" --command "$4"
}

# ---- create / delete / state ---------------------------------------------------------------

capacity_flags() {
  if [[ $SPOT == 1 ]]; then printf '%s\n' --spot; fi
  if [[ $RESERVED == 1 ]]; then printf '%s\n' --reserved; fi
}

cmd_create() {
  local cap=()
  mapfile -t cap < <(capacity_flags)
  log "creating $ACCELERATOR ($SLICES x $SLICE_TYPE, $HOSTS host(s) per slice, runtime $RUNTIME_VERSION)"
  if [[ $QUEUED == 1 ]]; then
    local nodes_flags=(--node-id "$TPU_NAME")
    ((SLICES == 1)) || nodes_flags=(--node-count "$SLICES" --node-prefix "$TPU_NAME")
    run "${QR[@]}" create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$SLICE_TYPE" \
      --runtime-version "$RUNTIME_VERSION" "${nodes_flags[@]}" "${cap[@]}"
    wait_active
  else
    run "${TPUVM[@]}" create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$SLICE_TYPE" \
      --version "$RUNTIME_VERSION" "${cap[@]}"
  fi
}

# READY / CREATING / PREEMPTED / ... for a TPU VM; ACTIVE / WAITING_FOR_RESOURCES / SUSPENDED /
# FAILED / ... for a queued resource; NOT_FOUND when it does not exist.
state() {
  local s
  if [[ $QUEUED == 1 ]]; then
    s=$(query NOT_FOUND "${QR[@]}" describe "$TPU_NAME" --zone "$ZONE" --format 'value(state.state)' 2>/dev/null) || s=NOT_FOUND
  else
    s=$(query NOT_FOUND "${TPUVM[@]}" describe "$TPU_NAME" --zone "$ZONE" --format 'value(state)' 2>/dev/null) || s=NOT_FOUND
  fi
  printf '%s' "${s:-NOT_FOUND}"
}

wait_active() {
  local s
  while :; do
    s=$(state)
    log "queued resource $TPU_NAME: $s"
    case $s in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED|NOT_FOUND) [[ $SGT_DRY_RUN == 1 ]] && return 0; die "queued resource $TPU_NAME is $s" ;;
    esac
    [[ $SGT_DRY_RUN == 1 ]] && return 0
    sleep "$POLL"
  done
}

cmd_delete() {
  if [[ $QUEUED == 1 ]]; then
    run "${QR[@]}" delete "$TPU_NAME" --zone "$ZONE" --force --quiet
  else
    run "${TPUVM[@]}" delete "$TPU_NAME" --zone "$ZONE" --quiet
  fi
}

# ---- setup ---------------------------------------------------------------------------------

code_url() {
  local rev
  rev=${SGT_CODE_REV:-$(git -C "$REPO" rev-parse --short=12 HEAD)}
  printf '%s/code/sgt-jax-%s.tar.gz' "$BUCKET" "$rev"
}

cmd_setup() {
  need_bucket
  local url tarball node remote out
  url=$(code_url)
  tarball="/tmp/$(basename "$url")"
  if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    log "warning: uncommitted changes are not shipped (the workers get HEAD)"
  fi
  run git -C "$REPO" archive --format=tar.gz -o "$tarball" HEAD
  run gcloud storage cp "$tarball" "$url"
  # Ubuntu 22.04 TPU images ship Python 3.10; the project needs 3.11 (jax 0.10).
  remote="set -e; if ! command -v python3.11 >/dev/null; then sudo apt-get update -qq"
  remote+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; fi"
  remote+="; python3.11 -m venv $VENV"
  remote+="; rm -rf $REMOTE_DIR.new && mkdir -p $REMOTE_DIR.new"
  remote+=" && gcloud storage cp $url /tmp/sgt-jax.tar.gz && tar -xzf /tmp/sgt-jax.tar.gz -C $REMOTE_DIR.new"
  remote+=" && rm -rf $REMOTE_DIR && mv $REMOTE_DIR.new $REMOTE_DIR"
  remote+="; $VENV/bin/pip install -q --upgrade pip"
  remote+=" && $VENV/bin/pip install -q -r $REMOTE_DIR/requirements.txt -r $REMOTE_DIR/requirements-tpu.txt"
  remote+="; echo SGT_VERSIONS \$($VENV/bin/python -c 'import jax, jaxlib, importlib.metadata as m;"
  remote+=" print(jax.__version__, jaxlib.__version__, m.version(\"libtpu\"))') \$($VENV/bin/pip freeze | sha256sum | cut -c1-16)"
  out=""
  while read -r node; do
    out+=$(ssh_query "SGT_VERSIONS 0.10.2 0.10.2 0.0.42.1 0123456789abcdef" "$node" all "$remote")$'\n'
  done < <(nodes)
  local distinct
  distinct=$(grep -o 'SGT_VERSIONS .*' <<<"$out" | sort -u)
  [[ -n $distinct ]] || die "setup printed no versions: see the output above"
  if (($(wc -l <<<"$distinct") != 1)); then
    die "version skew across hosts (every host needs identical jax / jaxlib / libtpu):"$'\n'"$distinct"
  fi
  log "every worker: jax / jaxlib / libtpu / pip-freeze hash = ${distinct#SGT_VERSIONS }"
}

# ---- run -----------------------------------------------------------------------------------

# The IP of worker 0 of the first slice: the jax.distributed coordinator.
coordinator_ip() {
  local node
  node=$(nodes | head -n 1)
  query "WORKER0_IP" "${TPUVM[@]}" describe "$node" --zone "$ZONE" --format 'value(networkEndpoints[0].ipAddress)'
}

cmd_run() {
  (($# > 0)) || die "run: give the command after --"
  need_bucket
  local ip slice=0 node env remote job
  ip=$(coordinator_ip)
  job=$(join_cmd "$@")
  while read -r node; do
    env=("JAX_COORDINATOR_ADDRESS=$ip:$COORDINATOR_PORT" "SGT_RUN=$RUN_NAME")
    [[ -z ${XLA_CACHE-$WORKDIR/xla_cache} ]] || env+=("JAX_COMPILATION_CACHE_DIR=${XLA_CACHE-$WORKDIR/xla_cache}")
    if ((SLICES > 1)); then
      env+=("MEGASCALE_COORDINATOR_ADDRESS=$ip" "MEGASCALE_NUM_SLICES=$SLICES" "MEGASCALE_SLICE_ID=$slice"
            "MEGASCALE_PORT=${MEGASCALE_PORT:-8081}")
    fi
    env+=("${JOB_ENV[@]}")
    remote="cd $REMOTE_DIR && mkdir -p $LOG_DIR && nohup setsid env $(join_cmd "${env[@]}")"
    remote+=" bash launch/worker.sh --log-dir $LOG_DIR --gcs-logs $WORKDIR/logs --slice $slice -- $job"
    remote+=" > $LOG_DIR/launcher.out 2>&1 < /dev/null &"
    ssh_cmd "$node" all "$remote"
    slice=$((slice + 1))
  done < <(nodes)
  log "started on $((SLICES * HOSTS)) worker(s); logs: launch/tpu.sh logs --worker N, or $WORKDIR/logs/"
}

train_cmd() {
  [[ -n $WORKDIR ]] || die "set --workdir or --bucket"
  local cmd=("$VENV/bin/python" -m sgt_jax.train --config "$CONFIG" --workdir "$WORKDIR") kv
  for kv in "$@"; do cmd+=("--config.${kv#--config.}"); done
  printf '%s\0' "${cmd[@]}"
}

cmd_train() {
  local cmd=()
  mapfile -d '' -t cmd < <(train_cmd "$@")
  cmd_run "${cmd[@]}"
}

# One line "SGT_EXIT SLICE WORKER CODE" per worker that started a run: the exit code worker.sh
# recorded, or "running" (the marker is looked for anywhere in a line of the ssh output).
exit_codes() {
  local node slice=0 remote
  remote="cd $LOG_DIR 2>/dev/null && for f in worker-*.log; do w=\${f#worker-};"
  remote+=" echo SGT_EXIT \${w%.log} \$(cat exit_code 2>/dev/null || echo running); done"
  while read -r node; do
    { ssh_query "SGT_EXIT 0 running" "$node" all "$remote" || true; } \
      | tr -d '\r' | sed -n "s/.*SGT_EXIT /SGT_EXIT $slice /p"
    slice=$((slice + 1))
  done < <(nodes)
}

# The job as a whole: "running", "done" (every worker exited 0) or the first failure,
# "worker W of slice S exited with CODE" (a worker that dies while the others still run included).
job_state() {
  local codes failed
  codes=$(exit_codes)
  failed=$(awk '$4 != "running" && $4 != "0" { print "worker " $3 " of slice " $2 " exited with " $4; exit }' <<<"$codes")
  if [[ -n $failed ]]; then printf '%s' "$failed"
  elif (($(grep -c ' 0$' <<<"$codes") == SLICES * HOSTS)); then printf 'done'
  else printf running; fi
}

# Stop the job on every worker before a restart: SIGTERM, then SIGKILL after 60 s (processes
# whose peer died wait in a collective and never reach the next step boundary).
stop_job() {
  local node remote
  remote="if [ -f $LOG_DIR/pid ]; then p=\$(cat $LOG_DIR/pid); kill -TERM \$p 2>/dev/null;"
  remote+=" for i in \$(seq 60); do kill -0 \$p 2>/dev/null || break; sleep 1; done;"
  remote+=" kill -KILL \$p 2>/dev/null; fi; true"
  while read -r node; do
    ssh_cmd "$node" all "$remote" || true
  done < <(nodes)
}

cmd_babysit() {
  local restarts=0 started=0 s job
  while :; do
    s=$(state)
    case $s in
      READY|ACTIVE) ;;
      NOT_FOUND)
        log "$TPU_NAME does not exist: creating it"
        cmd_create; cmd_setup; started=0 ;;
      PREEMPTED|TERMINATED|FAILED|SUSPENDED|STOPPED)
        log "$TPU_NAME is $s: deleting and re-creating it (the run resumes from $WORKDIR)"
        cmd_delete; cmd_create; cmd_setup; started=0 ;;
      *) log "$TPU_NAME is $s: waiting"; sleep "$POLL"; continue ;;
    esac
    if ((started == 0)); then
      cmd_train "$@"
      started=1
    fi
    [[ $SGT_DRY_RUN == 1 ]] && { job_state >/dev/null; return 0; }
    sleep "$POLL"
    job=$(job_state)
    case $job in
      running) ;;
      done) log "training finished (every worker exited 0)"; return 0 ;;
      *)
        restarts=$((restarts + 1))
        log "$job on a healthy TPU: stopping every worker and restarting the job (restart $restarts of $MAX_RESTARTS)"
        ((restarts <= MAX_RESTARTS)) || die "giving up after $MAX_RESTARTS restarts: launch/tpu.sh logs --worker N"
        stop_job
        started=0 ;;
    esac
  done
}

# ---- watch / stop ----------------------------------------------------------------------------

node_of_worker() { nodes | sed -n "$((SLICE + 1))p"; }

cmd_logs() {
  ssh_cmd "$(node_of_worker)" "$WORKER" "tail -n 200 -F $LOG_DIR/worker-$WORKER.log"
}

cmd_status() {
  printf '%s: %s\n' "$TPU_NAME" "$(state)"
  printf 'last run: %s\n' "$(job_state)"
  exit_codes | awk '{ print "  slice " $2 " worker " $3 ": " $4 }'
}

cmd_stop() {
  local node
  while read -r node; do
    ssh_cmd "$node" all "if [ -f $LOG_DIR/pid ]; then kill -TERM \$(cat $LOG_DIR/pid) 2>/dev/null || true; fi"
  done < <(nodes)
}

cmd_ssh() {
  run "${TPUVM[@]}" ssh "$(node_of_worker)" --zone "$ZONE" --worker="$WORKER"
}

case $COMMAND in
  create) cmd_create ;;
  setup) cmd_setup ;;
  run) cmd_run "${ARGS[@]}" ;;
  train) cmd_train "${ARGS[@]}" ;;
  babysit) cmd_babysit "${ARGS[@]}" ;;
  logs) cmd_logs ;;
  status) cmd_status ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
  ssh) cmd_ssh ;;
  *) die "unknown command '$COMMAND' (see --help)" ;;
esac
