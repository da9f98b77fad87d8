#!/usr/bin/env bash
# N processes on this machine, each with D CPU devices, talking through jax.distributed (gloo):
# the multi-host code path (per-host input shards, global batches, cross-process collectives)
# without a cluster.
#
#   launch/local_multiprocess.sh [NUM_PROCESSES=2] [DEVICES_PER_PROCESS=2] -- --workdir DIR [flags...]
#
# Everything after `--` goes to `python -m mura_jax.main` ($PYTHON, default `python`). Process 0's
# output is printed at the end; every process's log stays in a fresh /tmp/mura_jax_processes.* folder.
set -euo pipefail
num_processes=${1:-2}
devices=${2:-2}
shift $(( $# > 0 ? 1 : 0 )) || true
shift $(( $# > 0 ? 1 : 0 )) || true
[[ "${1:-}" == "--" ]] && shift
port=$(( 20000 + RANDOM % 20000 ))
python=${PYTHON:-python}
logs=$(mktemp -d /tmp/mura_jax_processes.XXXXXX)
pids=()
for (( i = num_processes - 1; i >= 0; i-- )); do
  env JAX_COORDINATOR_ADDRESS="localhost:${port}" JAX_NUM_PROCESSES="${num_processes}" \
      JAX_PROCESS_ID="${i}" JAX_CPU_COLLECTIVES=gloo JAX_PLATFORMS=cpu \
      XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
      "${python}" -m mura_jax.main "$@" > "${logs}/process_${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "${pid}" || status=$?; done
cat "${logs}/process_0.log"
echo "logs of all ${num_processes} processes: ${logs}"
exit "${status}"
