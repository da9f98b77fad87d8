#!/usr/bin/env bash
# N processes on this machine, each with D CPU devices, talking through jax.distributed (gloo):
# the multi-host code path (per-host input shards, global batches, cross-process collectives)
# without a cluster.
#
#   launch/local_multiprocess.sh [NUM_PROCESSES=2] [DEVICES_PER_PROCESS=2] -- --workdir DIR [flags...]
#
# Everything after `--` goes to `python -m mura_jax.main`. Process 0's output is shown; the
# others log to DIR-less files /tmp/mura_jax_process_<i>.log.
set -euo pipefail
num_processes=${1:-2}
devices=${2:-2}
shift $(( $# > 0 ? 1 : 0 )) || true
shift $(( $# > 0 ? 1 : 0 )) || true
[[ "${1:-}" == "--" ]] && shift
port=$(( 20000 + RANDOM % 20000 ))
python=${PYTHON:-python}
pids=()
for (( i = num_processes - 1; i >= 0; i-- )); do
  env JAX_COORDINATOR_ADDRESS="localhost:${port}" JAX_NUM_PROCESSES="${num_processes}" \
      JAX_PROCESS_ID="${i}" JAX_CPU_COLLECTIVES=gloo JAX_PLATFORMS=cpu \
      XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
      "${python}" -m mura_jax.main "$@" > "/tmp/mura_jax_process_${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "${pid}" || status=$?; done
cat /tmp/mura_jax_process_0.log
exit "${status}"
