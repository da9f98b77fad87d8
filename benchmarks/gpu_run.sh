#!/usr/bin/env bash
# benchmarks/vs_torch.py on one lent GPU, in ONE call of the device tool that fits its lease
# (15 minutes of device time per session, machine start included; 10 minutes per command).
# Usage, from the device tool (a session's only call; give the machine back after it):
#   run(command="bash benchmarks/gpu_run.sh", carry=["benchmarks/out/carry"], timeout_s=600)
# The accelerator image has no ml_collections: benchmarks/out/carry holds a copy of the venv's,
#   mkdir -p benchmarks/out/carry/site && cp -r .venv/lib/python3.11/site-packages/ml_collections \
#     benchmarks/out/carry/site/
# (grain and tensorflow_datasets, absent there too, are replaced by inert stand-ins: the train step
# does not use them; vs_torch.py records which.)
#
# Compilation is what costs the time (H200, jax 0.11.2, measured: the densenet169 train step
# compiles in 80 s fp32, and bf16 forward + train took over 200 s; several compilations in
# parallel slowed each other past 260 s), so the steps run one process at a time, the issue's two
# GPU targets first, each step given what is left of VS_BUDGET (seconds) and skipped when too
# little is left:
#   1. batch 256, train: torchvision AMP bf16 + channels_last; mura-jax bf16  (target >= 1.5x)
#   2. batch 8, train: torchvision eager fp32; mura-jax fp32                  (target >= 3x)
#   3. batch 8, train: mura-jax bf16
#   4. batch 256, train: torchvision eager fp32; mura-jax fp32
#   5. batch 256, forward: torchvision AMP; mura-jax bf16
#   6. batch 256, train: torchvision torch.compile (AMP), minutes of compilation
# Every result goes into one JSON, $OUT/vs_torch_gpu.json, rewritten after each measurement (what
# a killed call measured comes back), with the log beside it; the table at the end covers them all.
# mura-jax runs unrolled dense blocks (scan_segment 0, as the accelerator configs do); SCAN=8
# measures the scanned ones (less to compile); VS_STEPS="1 2" runs only those steps.
# VS_ALLOW_CPU=1 VS_ARCH=tiny VS_IMAGE_SIZE=32: a smoke run on a CPU (tests/test_benchmarks.py).
set -u -o pipefail
OUT=${OUT:-/tmp/vs_torch_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${VS_BUDGET:-520}
MIN_STEP=${VS_MIN_STEP:-45}  # seconds: a step started with less left would measure nothing
JSON="$OUT/vs_torch_gpu.json"
LOG="$OUT/vs_torch_gpu.log"
export PYTHONPATH="$PWD:$PWD/benchmarks/out/carry/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
rm -f "$JSON"
{
  date; uptime; nproc; nvidia-smi || true
  $PY - <<'PY'
import platform, jax, flax, optax, torch, torchvision
print('python', platform.python_version(), 'jax', jax.__version__, 'flax', flax.__version__,
      'optax', optax.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__,
      'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
print('jax devices', jax.devices())
import sys; sys.path.insert(0, 'benchmarks'); import vs_torch
print('mura_jax.training.train imported; stubbed:', vs_torch.import_train()[1])
print('torch device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')
PY
} 2>&1 | tee "$LOG"
if [ -z "${VS_ALLOW_CPU:-}" ] && ! grep "jax devices" "$LOG" | grep -qi "cuda"; then
  echo "JAX sees no GPU here: nothing measured (VS_ALLOW_CPU=1 runs the steps on a CPU)."
  exit 3
fi

end=$((SECONDS + BUDGET))
STEPS=" ${VS_STEPS:-1 2 3 4 5 6} "  # which of the steps below run
measure() {  # measure TITLE VS_TORCH_ARGS...: one vs_torch.py run in what is left of the budget
  local title=$1 left=$((end - SECONDS))
  shift
  [[ "$STEPS" == *" ${title%%.*} "* ]] || return 0
  if [ "$left" -lt "$MIN_STEP" ]; then
    echo "== $title: skipped, ${left} s of the ${BUDGET} s budget left" | tee -a "$LOG"
    return 0
  fi
  echo "== $title (${left} s left)" | tee -a "$LOG"
  $PY benchmarks/vs_torch.py --arch "${VS_ARCH:-densenet169}" --image-size "${VS_IMAGE_SIZE:-224}" \
      --rounds 1 --warmup 2 --warmup-seconds 0 --min-seconds "${VS_MIN_SECONDS:-3}" \
      --job-timeout "$left" --budget "$left" --jax-model-options "{\"scan_segment\": ${SCAN:-0}}" \
      --append --json "$JSON" "$@" 2>&1 | tee -a "$LOG"
}
measure "1. batch 256 train, bf16 (target: mura-jax >= 1.5x torch's best)" \
    --batches 256 --what train --torch-modes amp --jax-dtypes bfloat16
measure "2. batch 8 train, fp32 (target: mura-jax >= 3x torch eager)" \
    --batches 8 --what train --torch-modes eager --jax-dtypes float32
measure "3. batch 8 train, mura-jax bf16" --batches 8 --what train --torch-modes '' \
    --jax-dtypes bfloat16
measure "4. batch 256 train, fp32" --batches 256 --what train --torch-modes eager \
    --jax-dtypes float32
measure "5. batch 256 forward" --batches 256 --what forward --torch-modes amp --jax-dtypes bfloat16
measure "6. batch 256 train, torch.compile" --batches 256 --what train --torch-modes compile \
    --jax-dtypes ''
echo "== done in ${SECONDS} s; every measurement: $JSON" | tee -a "$LOG"
