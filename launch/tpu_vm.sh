#!/usr/bin/env bash
# Training on a Cloud TPU VM (one host or a pod slice), step by step; every step prints its exact
# commands first, and --dry-run prints them without running anything.
#
#   launch/tpu_vm.sh create --tpu NAME --zone ZONE [--accelerator v4-32] [--runtime VERSION]
#                           [--spot]
#   launch/tpu_vm.sh setup  --tpu NAME --zone ZONE [--weights densenet169-b2777c0a.pth]
#   launch/tpu_vm.sh build  --tpu NAME --zone ZONE --manual-dir gs://B/manual --data-dir gs://B/tfds
#   launch/tpu_vm.sh train  --tpu NAME --zone ZONE --workdir gs://B/run --data-dir gs://B/tfds
#                           [--hosts N] [-- extra --config.* flags]
#   launch/tpu_vm.sh logs   --tpu NAME --zone ZONE              (follows worker 0's log)
#   launch/tpu_vm.sh resume --tpu NAME --zone ZONE --workdir ... --data-dir ... [same as train]
#                           (after a spot preemption: re-creates the VM if it is gone, sets it
#                           up, and trains again: the run continues from its latest checkpoint)
#   launch/tpu_vm.sh delete --tpu NAME --zone ZONE
#
# setup copies this checkout (its committed files, `git archive HEAD`) to every worker and
# installs it with the TPU extra; build writes the `mura` dataset once, from worker 0, into a
# gs:// data dir every host reads; train runs the same command on every worker (--worker=all)
# with configs/tpu_pod.py, jax.distributed on every host, and the launcher's host count checked
# at start (MURA_JAX_NUM_PROCESSES). The workdir and data dir must be gs:// paths.
set -euo pipefail

# The comment block above (what each command needs and does), to stdout.
usage() { awk 'NR > 1 && !/^#( |$)/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
needs_value() { (( $# >= 2 )) || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }; }
# --help or -h before `--` prints the usage, before any other check.
for arg in "$@"; do
  [[ "$arg" == -- ]] && break
  [[ "$arg" == --help || "$arg" == -h ]] && { usage; exit 0; }
done

(( $# >= 1 )) || { usage >&2; exit 2; }
command=$1; shift
case "$command" in  # before the flags: `tpu_vm.sh crate --tpu t ...` names the typo
  create|setup|build|train|logs|resume|delete) ;;
  *) echo "error: unknown command '$command'" >&2; usage >&2; exit 2 ;;
esac
tpu='' zone='' accelerator='v4-32' runtime='tpu-ubuntu2204-base' spot=0 weights=''
manual_dir='' data_dir='' workdir='' hosts='' dry_run=0 extra=()
while (( $# )); do
  case "$1" in
    --tpu) needs_value "$@"; tpu=$2; shift 2 ;;
    --zone) needs_value "$@"; zone=$2; shift 2 ;;
    --accelerator) needs_value "$@"; accelerator=$2; shift 2 ;;
    --runtime) needs_value "$@"; runtime=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --weights) needs_value "$@"; weights=$2; shift 2 ;;
    --manual-dir) needs_value "$@"; manual_dir=$2; shift 2 ;;
    --data-dir) needs_value "$@"; data_dir=$2; shift 2 ;;
    --workdir) needs_value "$@"; workdir=$2; shift 2 ;;
    --hosts) needs_value "$@"; hosts=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$tpu" && -n "$zone" ]] || { echo "error: --tpu and --zone are required" >&2; exit 2; }

# Prints a command, quoted so that it can be pasted, then runs it (not with --dry-run).
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  (( dry_run )) || "$@"
}

# One shell command line for the workers, every word quoted as given.
remote() { local IFS=' '; printf '%q ' "$@"; }

ssh_workers() {  # ssh_workers WORKER COMMAND_LINE
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker="$1" --command "$2"
}

need_gs() {  # need_gs NAME VALUE
  [[ "$2" == gs://* ]] || {
    echo "error: --$1 must be a gs:// path every host reads, got '$2'" >&2; exit 2; }
}

create() {
  local flags=(--zone "$zone" --accelerator-type "$accelerator" --version "$runtime")
  (( spot )) && flags+=(--spot)
  run gcloud compute tpus tpu-vm create "$tpu" "${flags[@]}"
}

setup() {
  archive=$(mktemp /tmp/mura-jax.XXXXXX.tar.gz)
  trap 'rm -f "$archive"' EXIT  # the copy of this checkout is not left in /tmp (dry runs too)
  run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu:mura-jax.tar.gz" --zone "$zone" --worker=all
  local install
  install=$(remote python3 -m pip install -q -e 'mura-jax[tpu]')
  ssh_workers all "mkdir -p mura-jax && tar -xzf mura-jax.tar.gz -C mura-jax && ${install}"
  if [[ -n "$weights" ]]; then
    ssh_workers all "mkdir -p mura-jax/weights"
    run gcloud compute tpus tpu-vm scp "$weights" "$tpu:mura-jax/weights/$(basename "$weights")" \
      --zone "$zone" --worker=all
  fi
}

build() {
  need_gs data-dir "$data_dir"
  [[ -n "$manual_dir" ]] || {
    echo "error: build needs --manual-dir (holding MURA-v1.1.zip)" >&2; exit 2; }
  ssh_workers 0 "cd mura-jax && $(remote python3 -m tfds_mura.build --manual_dir "$manual_dir" \
                                   --data_dir "$data_dir")"
}

train() {
  need_gs workdir "$workdir"; need_gs data-dir "$data_dir"
  if [[ -z "$hosts" ]]; then
    if (( dry_run )); then
      hosts='HOSTS'
      # shellcheck disable=SC2016  # the $(...) is printed for the reader, not run
      printf '+ hosts=$(gcloud compute tpus tpu-vm describe %q --zone %q --format=%q | wc -l)\n' \
        "$tpu" "$zone" 'value[delimiter="\n"](networkEndpoints[].ipAddress)'
    else
      hosts=$(gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" \
        --format='value[delimiter="\n"](networkEndpoints[].ipAddress)' | wc -l)
    fi
  fi
  local main=(python3 -m mura_jax.main --config configs/tpu_pod.py --workdir "$workdir"
              "--config.data.data_dir=$data_dir")
  [[ -n "$weights" ]] && main+=("--config.model.init=torchvision:weights/$(basename "$weights")")
  main+=("${extra[@]}")
  # Detached, so that the ssh session may end; `logs` follows it.
  local line
  # JAX on the TPU or not at all: no quiet fall-back to the CPU (parallel.check_devices).
  line="cd mura-jax && MURA_JAX_NUM_PROCESSES=$hosts JAX_PLATFORMS=tpu MURA_JAX_PLATFORM=tpu"
  line+=" nohup $(remote "${main[@]}")"
  ssh_workers all "${line}> ../mura-train.log 2>&1 &"
}

case "$command" in
  create) create ;;
  setup) setup ;;
  build) build ;;
  train) train ;;
  logs) ssh_workers 0 "tail -n 200 -F mura-train.log" ;;
  resume)
    if (( dry_run )) \
       || ! gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone" > /dev/null 2>&1; then
      (( dry_run )) && printf '+ # if the TPU VM is gone (spot preemption):\n'
      create; setup
    fi
    train ;;
  delete) run gcloud compute tpus tpu-vm delete "$tpu" --zone "$zone" --quiet ;;
esac
