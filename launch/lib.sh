#!/usr/bin/env bash
# Helpers sourced by launch/tpu.sh: printing / running commands (dry-run), TPU topology facts.
# shellcheck shell=bash

SGT_DRY_RUN=${SGT_DRY_RUN:-0}

log() { printf '[sgt-launch] %s\n' "$*" >&2; }
die() { printf '[sgt-launch] error: %s\n' "$*" >&2; exit 1; }

# One argument, quoted for a POSIX shell only when it needs it (copy-pasteable, shlex-parsable).
quote() {
  local a=$1
  if [[ -n $a && $a =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
    printf '%s' "$a"
  else
    printf "'%s'" "${a//\'/\'\\\'\'}"
  fi
}

# "+ cmd arg ..." on fd SGT_SHOW_FD (dry-run; tpu.sh points it at its own stdout, so commands run
# inside $(...) are shown too) or on stderr (a trace of a real run).
show() {
  local out="+" a
  for a in "$@"; do out+=" $(quote "$a")"; done
  if [[ $SGT_DRY_RUN == 1 ]]; then
    printf '%s\n' "$out" >&"${SGT_SHOW_FD:-1}"
  else
    printf '%s\n' "$out" >&2
  fi
}

# Run a command; in dry-run mode only print it.
run() {
  show "$@"
  if [[ $SGT_DRY_RUN != 1 ]]; then "$@"; fi
}

# Run a command for its output. Dry-run: print it and output the placeholder $1 instead.
query() {
  local placeholder=$1
  shift
  show "$@"
  if [[ $SGT_DRY_RUN == 1 ]]; then
    printf '%s\n' "$placeholder"
  else
    "$@"
  fi
}

# Join the arguments into one shell command line (each quoted as needed).
join_cmd() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(quote "$a")"; done
  printf '%s' "$out"
}

# ---- topology facts ------------------------------------------------------------------------
# These mirror sgt_jax/parallel/tpu.py (CHIPS: per_chip, accelerator, runtime) and
# sgt_jax/aot/topology.py (hosts); tests/test_tpu_facts.py fails when the two disagree.
# ACCELERATOR is a slice type as gcloud names it (v4-32, v5p-64, v5litepod-16, v6e-64; v5e-N is
# accepted for v5litepod-N), optionally prefixed "Kx" for K slices (2xv5p-64).

num_slices() {
  if [[ $1 =~ ^([0-9]+)x ]]; then printf '%s' "${BASH_REMATCH[1]}"; else printf '1'; fi
}

# gcloud --accelerator-type of one slice
slice_type() {
  local t=$1
  if [[ $t =~ ^[0-9]+x(.+)$ ]]; then t=${BASH_REMATCH[1]}; fi
  t=${t/#v5e-/v5litepod-}
  [[ $t =~ ^(v4|v5p|v5litepod|v6e)-[0-9]+$ ]] || die "unknown accelerator '$1' (v4-N, v5p-N, v5litepod-N / v5e-N, v6e-N, KxTYPE)"
  printf '%s' "$t"
}

family() { local t; t=$(slice_type "$1"); printf '%s' "${t%-*}"; }

chips_per_slice() {
  local t n
  t=$(slice_type "$1")
  n=${t##*-}
  case ${t%-*} in
    v4|v5p) printf '%s' $((n / 2)) ;;      # the number counts TensorCores, 2 per chip
    *) printf '%s' "$n" ;;
  esac
}

# TPU VM hosts (workers) in one slice: 4 chips per host; v5e / v6e slices up to 8 chips are one host
hosts_per_slice() {
  local chips f
  chips=$(chips_per_slice "$1")
  f=$(family "$1")
  if [[ $f == v5litepod || $f == v6e ]] && ((chips <= 8)); then
    printf '1'
  elif ((chips <= 4)); then
    printf '1'
  else
    printf '%s' $((chips / 4))
  fi
}

default_runtime() {
  case $(family "$1") in
    v4) printf 'tpu-ubuntu2204-base' ;;
    v5p) printf 'v2-alpha-tpuv5' ;;
    v5litepod) printf 'v2-alpha-tpuv5-lite' ;;
    v6e) printf 'v2-alpha-tpuv6e' ;;
  esac
}
