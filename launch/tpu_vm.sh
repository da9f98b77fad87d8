#!/usr/bin/env bash
# Training on a Cloud TPU VM (one host or a pod slice), step by step; every step prints its exact
# commands first, and --dry-run prints them without running anything.
#
#   launch/tpu_vm.sh create --tpu NAME --zone ZONE [--accelerator v4-32] [--runtime VERSION]
#                           [--spot [--no-queue]]
#   launch/tpu_vm.sh setup  --tpu NAME --zone ZONE [--weights densenet169-b2777c0a.pth]
#                           [--python 3.11]
#   launch/tpu_vm.sh build  --tpu NAME --zone ZONE --manual-dir gs://B/manual --data-dir gs://B/tfds
#   launch/tpu_vm.sh train  --tpu NAME --zone ZONE --workdir gs://B/run --data-dir gs://B/tfds
#                           [--weights FILE] [--compilation-cache gs://B/cache] [--hosts N]
#                           [-- extra --config.* flags]
#   launch/tpu_vm.sh logs   --tpu NAME --zone ZONE              (follows worker 0's log)
#   launch/tpu_vm.sh resume --tpu NAME --zone ZONE --workdir ... --data-dir ... [create's, setup's
#                           and train's flags]
#   launch/tpu_vm.sh delete --tpu NAME --zone ZONE [--spot]
#
# What each step needs, does and checks:
#   create  gcloud. The runtime follows the accelerator type (v4 and older: tpu-ubuntu2204-base,
#           v5e (v5litepod-N): v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e;
#           --runtime overrides). --spot asks for Spot capacity through a queued resource of the
#           same name, which waits for capacity where a plain create fails; --no-queue creates
#           the Spot VM directly.
#   setup   git here (this checkout's committed files, `git archive HEAD`, go to every worker).
#           On every worker it makes a Python environment of version --python (default 3.11;
#           the TPU image has 3.10 and jax needs >= 3.11) with uv's managed Python in
#           ~/mura-jax/.venv and installs the `tpu` extra there; build and train run that
#           Python. --weights: a .safetensors goes to every worker as it is; a .pth (which needs
#           torch, not on the workers) is converted here first, once, beside it: `python -m
#           mura_jax.models.convert FILE.pth FILE.safetensors` ($PYTHON, default python3, with
#           mura-jax[torch] here).
#   build   a gs:// bucket: writes the `mura` dataset once, from worker 0, into --data-dir.
#   train   gs:// --workdir and --data-dir (every host reads them); runs configs/tpu_pod.py on
#           every worker with jax.distributed; every host checks that JAX runs on its TPU
#           (JAX_PLATFORMS=tpu, no fall-back to the CPU) and that all --hosts joined. JAX's
#           compilation cache is shared in gs:// (default WORKDIR/compilation_cache; process 0
#           writes, all read, a re-created VM finds it); the traced-step cache is off on several
#           hosts. --weights: as given to setup (the converted .safetensors is passed).
#   resume  reads the node's state (with --spot, its queued resource's first): READY trains;
#           PREEMPTED, TERMINATED, SUSPENDED or FAILED are deleted and created again (a Spot VM
#           cannot be restarted); a missing one is created; one being created, queued or
#           deleted is waited for (every MURA_JAX_POLL_SECONDS, default 30); STOPPED is
#           started. A new VM is set up; then train: the run continues from its latest
#           checkpoint.
#   delete  the VM, or with --spot its queued resource and the VM (--force).
# resume and delete need the --spot (and --no-queue) that create was given: they say whether a
# queued resource owns the VM.
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
tpu='' zone='' accelerator='v4-32' runtime='' spot=0 queue=1 weights='' python_version=3.11
manual_dir='' data_dir='' workdir='' hosts='' cache='' dry_run=0 extra=()
while (( $# )); do
  case "$1" in
    --tpu) needs_value "$@"; tpu=$2; shift 2 ;;
    --zone) needs_value "$@"; zone=$2; shift 2 ;;
    --accelerator) needs_value "$@"; accelerator=$2; shift 2 ;;
    --runtime) needs_value "$@"; runtime=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --no-queue) queue=0; shift ;;
    --weights) needs_value "$@"; weights=$2; shift 2 ;;
    --python) needs_value "$@"; python_version=$2; shift 2 ;;
    --manual-dir) needs_value "$@"; manual_dir=$2; shift 2 ;;
    --data-dir) needs_value "$@"; data_dir=$2; shift 2 ;;
    --workdir) needs_value "$@"; workdir=$2; shift 2 ;;
    --hosts) needs_value "$@"; hosts=$2; shift 2 ;;
    --compilation-cache) needs_value "$@"; cache=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$tpu" && -n "$zone" ]] || { echo "error: --tpu and --zone are required" >&2; exit 2; }
[[ "$python_version" =~ ^3\.(1[1-9]|[2-9][0-9])$ ]] || {
  echo "error: --python $python_version: jax needs Python 3.11 or newer (e.g. --python 3.12)" >&2
  exit 2; }
(( spot && queue )) && queued=1 || queued=0

# The runtime (software version) of each TPU generation, as Cloud TPU's "TPU software versions"
# page names them for JAX (https://cloud.google.com/tpu/docs/runtimes): v6e (Trillium)
# v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base.
if [[ -z "$runtime" ]]; then
  case "$accelerator" in
    v6e-*) runtime='v2-alpha-tpuv6e' ;;
    v5p-*) runtime='v2-alpha-tpuv5' ;;
    v5litepod-*|v5e-*) runtime='v2-alpha-tpuv5-lite' ;;
    v2-*|v3-*|v4-*) runtime='tpu-ubuntu2204-base' ;;
    *) echo "error: no runtime known for --accelerator $accelerator: pass --runtime VERSION" \
            "(https://cloud.google.com/tpu/docs/runtimes)" >&2; exit 2 ;;
  esac
fi

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

# The environment setup makes on every worker (inside ~/mura-jax); build and train run it.
VENV_PYTHON=.venv/bin/python

# The weights file the workers read: a .pth's converted twin (setup makes it), else as given.
worker_weights() {
  local name; name=$(basename "$weights")
  [[ "$name" == *.safetensors ]] || name="${name%.*}.safetensors"
  echo "weights/$name"
}

create() {
  if (( queued )); then
    run gcloud compute tpus queued-resources create "$tpu" --node-id "$tpu" --zone "$zone" \
      --accelerator-type "$accelerator" --runtime-version "$runtime" --spot
  else
    local flags=(--zone "$zone" --accelerator-type "$accelerator" --version "$runtime")
    (( spot )) && flags+=(--spot)
    run gcloud compute tpus tpu-vm create "$tpu" "${flags[@]}"
  fi
}

delete() {
  if (( queued )); then  # --force: the queued resource's VM too
    run gcloud compute tpus queued-resources delete "$tpu" --zone "$zone" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$tpu" --zone "$zone" --quiet
  fi
}

# weights_file: the .safetensors the workers get: as given, converted before (beside the .pth),
# or converted now.
convert_weights() {
  weights_file=$weights
  [[ "$weights" == *.safetensors ]] && return
  weights_file="${weights%.*}.safetensors"
  if [[ -e "$weights_file" ]]; then
    echo "+ # $weights_file exists: converted before"
    return
  fi
  local repo; repo=$(cd "$(dirname "$0")/.." && pwd)
  run env "PYTHONPATH=$repo" "${PYTHON:-python3}" -m mura_jax.models.convert "$weights" \
    "$weights_file" || {
    echo "error: converting $weights needs mura-jax and torch on this machine (pip install" \
         "'mura-jax[torch]'); or run 'python -m mura_jax.models.convert $weights" \
         "$weights_file' where they are installed and pass --weights $weights_file" >&2; exit 1; }
}

setup() {
  # First: a failed conversion stops before anything reaches the VM.
  [[ -z "$weights" ]] || convert_weights
  archive=$(mktemp /tmp/mura-jax.XXXXXX.tar.gz)
  trap 'rm -f "$archive"' EXIT  # the copy of this checkout is not left in /tmp (dry runs too)
  run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu:mura-jax.tar.gz" --zone "$zone" --worker=all
  # Python >= 3.11 where the image has 3.10: uv (a pip package) fetches its managed CPython, no
  # sudo and no apt lock (public TPU setup scripts use uv or the deadsnakes PPA alike).
  local install
  install="$(remote python3 -m pip install -q --user uv) && "
  install+="$(remote python3 -m uv venv -q --allow-existing --python "$python_version" .venv) && "
  install+="$(remote python3 -m uv pip install -q --python "$VENV_PYTHON" -e '.[tpu]') && "
  install+="$(remote "$VENV_PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)')"
  ssh_workers all \
    "mkdir -p mura-jax && tar -xzf mura-jax.tar.gz -C mura-jax && cd mura-jax && ${install}"
  if [[ -n "$weights" ]]; then
    ssh_workers all "mkdir -p mura-jax/weights"
    run gcloud compute tpus tpu-vm scp "$weights_file" "$tpu:mura-jax/$(worker_weights)" \
      --zone "$zone" --worker=all
  fi
}

build() {
  need_gs data-dir "$data_dir"
  [[ -n "$manual_dir" ]] || {
    echo "error: build needs --manual-dir (holding MURA-v1.1.zip)" >&2; exit 2; }
  ssh_workers 0 "cd mura-jax && $(remote "$VENV_PYTHON" -m tfds_mura.build \
                                   --manual_dir "$manual_dir" --data_dir "$data_dir")"
}

train() {
  need_gs workdir "$workdir"; need_gs data-dir "$data_dir"
  cache=${cache:-${workdir%/}/compilation_cache}
  need_gs compilation-cache "$cache"
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
  local main=("$VENV_PYTHON" -m mura_jax.main --config configs/tpu_pod.py --workdir "$workdir"
              "--config.data.data_dir=$data_dir" "--config.compilation_cache_dir=$cache")
  [[ -n "$weights" ]] && main+=("--config.model.init=torchvision:$(worker_weights)")
  main+=("${extra[@]}")
  # Detached, so that the ssh session may end; `logs` follows it.
  local line
  # JAX on the TPU or not at all: no quiet fall-back to the CPU (parallel.check_devices).
  line="cd mura-jax && MURA_JAX_NUM_PROCESSES=$hosts JAX_PLATFORMS=tpu MURA_JAX_PLATFORM=tpu"
  line+=" nohup $(remote "${main[@]}")"
  ssh_workers all "${line}> ../mura-train.log 2>&1 &"
}

# The state of the node (`value(state)`) or of its queued resource (`value(state.state)`), or
# MISSING where gcloud answers NOT_FOUND; any other failure of gcloud stops with its message.
state_of() {  # state_of tpu-vm|queued-resources
  local format='value(state)' out errors status=0
  [[ "$1" == queued-resources ]] && format='value(state.state)'
  errors=$(mktemp)
  out=$(gcloud compute tpus "$1" describe "$tpu" --zone "$zone" --format="$format" 2> "$errors") \
    || status=$?
  if (( status )); then
    if grep -q NOT_FOUND "$errors"; then
      out=MISSING
    else
      echo "error: gcloud compute tpus $1 describe $tpu failed:" >&2; cat "$errors" >&2
      rm -f "$errors"; exit 1
    fi
  fi
  rm -f "$errors"
  out=${out//[[:space:]]/}
  echo "${out:-UNKNOWN}"
}

# resume: brings the node to READY from whatever state it is in, sets up a new one, trains.
resume() {
  local kind=tpu-vm state='' seen='' fresh=0
  (( queued )) && kind='queued-resources'
  if (( dry_run )); then
    printf '+ gcloud compute tpus %s describe %q --zone %q --format=%q\n' "$kind" "$tpu" "$zone" \
      "$( (( queued )) && echo 'value(state.state)' || echo 'value(state)')"
    printf '+ # as if the node were gone (a dry run reads no state):\n'
    create; setup; train; return
  fi
  while true; do
    state=$(state_of "$kind")
    if (( queued )) && [[ "$state" == ACTIVE ]]; then  # the queued resource's VM decides
      state=$(state_of tpu-vm)
      [[ "$state" == MISSING ]] && state=PREEMPTED  # its VM is gone: the request is spent
    fi
    [[ "$state" != "$seen" ]] && echo "resume: $tpu is $state"
    seen=$state
    case "$state" in
      READY) break ;;
      MISSING) create; fresh=1 ;;
      PREEMPTED|TERMINATED|SUSPENDED|FAILED) delete; create; fresh=1 ;;
      STOPPED) run gcloud compute tpus tpu-vm start "$tpu" --zone "$zone" ;;
      CREATING|WAITING_FOR_RESOURCES|ACCEPTED|PROVISIONING)
        fresh=1; sleep "${MURA_JAX_POLL_SECONDS:-30}" ;;
      STARTING|RESTARTING|REPAIRING|STOPPING|SUSPENDING|DELETING)
        sleep "${MURA_JAX_POLL_SECONDS:-30}" ;;
      *) echo "error: $tpu is in state $state, which resume does not handle: see" \
              "'gcloud compute tpus $kind describe $tpu --zone $zone', then resume again or" \
              "delete it" >&2; exit 1 ;;
    esac
  done
  (( fresh )) && setup
  train
}

case "$command" in
  create) create ;;
  setup) setup ;;
  build) build ;;
  train) train ;;
  logs) ssh_workers 0 "tail -n 200 -F mura-train.log" ;;
  resume) resume ;;
  delete) delete ;;
esac
