#!/usr/bin/env bash
# N processes on this machine, each with D CPU devices, talking through jax.distributed (gloo):
# the multi-host code path (per-host input shards, global batches, cross-process collectives,
# the preemption sync point) without a cluster.
#
#   launch/local_multiprocess.sh [--processes N] [--devices D] [--no-build] [--dry-run] \
#       -- --workdir DIR [flags...]
#
# N and D default to 2. Everything after `--` goes to `python -m mura_jax.main` ($PYTHON, default
# `python`: Python >= 3.11 with mura-jax installed). First, one process prepares the dataset
# (--config.mode=data with the same flags: the demo's synthetic MURA written and built once, a
# built data dir checked) so that the N processes do not all write it; --no-build skips that.
# Process 0's output is printed at the end; every process's log (and pids, one per line) stays
# in a fresh /tmp/mura_jax_processes.* folder, printed first.
#
# N x D trains bit for bit what --processes 1 --devices N*D trains (both over gloo) when each
# process's XLA:CPU thread pool is as large: it has max(NPROC or the cores, D) threads, and
# convolutions split their sums by it (tests/test_multihost.py sets NPROC).
set -euo pipefail
# The comment block above (what each command needs and does), to stdout.
usage() { awk 'NR > 1 && !/^#( |$)/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
needs_value() { (( $# >= 2 )) || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }; }
# --help or -h before `--` prints the usage, before any other check.
for arg in "$@"; do
  [[ "$arg" == -- ]] && break
  [[ "$arg" == --help || "$arg" == -h ]] && { usage; exit 0; }
done
num_processes=2 devices=2 dry_run=0 build=1
while (( $# )); do
  case "$1" in
    --processes) needs_value "$@"; num_processes=$2; shift 2 ;;
    --devices) needs_value "$@"; devices=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --no-build) build=0; shift ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (flags for mura_jax.main go after --)" >&2; exit 2 ;;
  esac
done
[[ "$num_processes" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]] || {
  echo "error: --processes and --devices take positive integers" >&2; exit 2; }
port=$(( 20000 + RANDOM % 20000 ))
python=${PYTHON:-python}
logs=/tmp/mura_jax_processes.DRY_RUN
(( dry_run )) || logs=$(mktemp -d /tmp/mura_jax_processes.XXXXXX)
echo "logs: ${logs}"
if (( build )); then  # one process, before the others start
  command=(env JAX_PLATFORMS=cpu MURA_JAX_PLATFORM=cpu "${python}" -m mura_jax.main "$@"
           --config.mode=data)
  printf '+'; printf ' %q' "${command[@]}"; printf ' > %q 2>&1\n' "${logs}/data.log"
  if (( ! dry_run )) && ! "${command[@]}" > "${logs}/data.log" 2>&1; then
    cat "${logs}/data.log"
    echo "error: preparing the dataset failed (log: ${logs}/data.log); no process started" >&2
    exit 1
  fi
fi
pids=()
for (( i = num_processes - 1; i >= 0; i-- )); do
  command=(env "JAX_COORDINATOR_ADDRESS=localhost:${port}" "JAX_NUM_PROCESSES=${num_processes}"
           "JAX_PROCESS_ID=${i}" JAX_CPU_COLLECTIVES=gloo JAX_PLATFORMS=cpu MURA_JAX_PLATFORM=cpu
           "MURA_JAX_LOCAL_DEVICES=${devices}"
           "XLA_FLAGS=--xla_force_host_platform_device_count=${devices}"
           "${python}" -m mura_jax.main "$@")
  printf '+'; printf ' %q' "${command[@]}"; printf ' > %q 2>&1 &\n' "${logs}/process_${i}.log"
  (( dry_run )) && continue
  "${command[@]}" > "${logs}/process_${i}.log" 2>&1 &
  pids+=($!)
  echo "$!" >> "${logs}/pids"
done
(( dry_run )) && exit 0
status=0
for pid in "${pids[@]}"; do wait "${pid}" || status=$?; done
cat "${logs}/process_0.log"
echo "logs of all ${num_processes} processes: ${logs}"
exit "${status}"
