#!/usr/bin/env bash
# benchmarks/vs_torch.py on one lent GPU (the device tool's `run`), results under $OUT.
#   PART=256  batch 256: torchvision eager fp32, AMP bf16 + channels_last, torch.compile (AMP);
#             mura-jax's real train step fp32 and bf16; train and eval forward
#   PART=8    batches 8 and 64: torchvision eager fp32 and AMP; mura-jax fp32 and bf16
# Each part is one call of about 8-10 minutes: on an H200 (jax 0.11.2) XLA compiles the densenet169
# train step in 80 s (fp32; lowering 7 s) and bf16 forward + train in over 200 s, torch.compile
# needs minutes too; compiling several processes in parallel on the host's 16 cores made every
# compile take over 260 s (measured), so everything here runs one process at a time.
# Usage (from the repository root): OUT=/tmp/out PART=256 bash benchmarks/gpu_run.sh
# mura-jax runs with unrolled dense blocks (scan_segment 0, what the accelerator configs use);
# SCAN=8 measures the scanned blocks instead (config.model.scan_segment; CPU figures in
# BENCHMARKS.md), e.g. OUT=/tmp/out PART=8 SCAN=8 VS_BUDGET=300 bash benchmarks/gpu_run.sh.
# The accelerator image has no ml_collections: carry benchmarks/out/carry, a copy of the venv's
#   mkdir -p benchmarks/out/carry/site && cp -r .venv/lib/python3.11/site-packages/ml_collections \
#     benchmarks/out/carry/site/
# (grain and tensorflow_datasets, absent there too, are replaced by inert stand-ins: the train step
# does not use them; vs_torch.py records which.)
set -u
OUT=${OUT:-/tmp/vs_torch_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
PART=${PART:-256}
export PYTHONPATH="$PWD:$PWD/benchmarks/out/carry/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  date; uptime; nproc; nvidia-smi
  $PY - <<'PY'
import platform, jax, flax, optax, torch, torchvision
print('python', platform.python_version(), 'jax', jax.__version__, 'flax', flax.__version__,
      'optax', optax.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__,
      'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
print('jax devices', jax.devices())
import sys; sys.path.insert(0, 'benchmarks'); import vs_torch
print('mura_jax.train imported; stubbed:', vs_torch.import_train()[1])
print('torch device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# VS_ALLOW_CPU=1 VS_ARCH=tiny VS_IMAGE_SIZE=64: a smoke test of this script on a CPU machine.
[ -n "${VS_ALLOW_CPU:-}" ] || grep -qi "cuda" <(grep "jax devices" "$OUT/env.txt") \
  || { echo "JAX sees no GPU"; exit 3; }
COMMON="--arch ${VS_ARCH:-densenet169} --image-size ${VS_IMAGE_SIZE:-224} --rounds 1 --warmup 2
        --min-seconds 3 --job-timeout 330 --budget ${VS_BUDGET:-420}"
SCAN_OPTIONS="{\"scan_segment\": ${SCAN:-0}}"
if [ "$PART" = 256 ]; then
  $PY benchmarks/vs_torch.py $COMMON --batches 256 --torch-modes eager,amp,compile \
      --jax-dtypes float32,bfloat16 --jax-model-options "$SCAN_OPTIONS" \
      --json "$OUT/vs_torch_gpu_256_scan${SCAN:-0}.json" 2>&1 \
      | tee "$OUT/vs_torch_gpu_256_scan${SCAN:-0}.log"
else
  $PY benchmarks/vs_torch.py $COMMON --batches 8,64 --torch-modes eager,amp \
      --jax-dtypes float32,bfloat16 --jax-model-options "$SCAN_OPTIONS" \
      --json "$OUT/vs_torch_gpu_8_64_scan${SCAN:-0}.json" 2>&1 \
      | tee "$OUT/vs_torch_gpu_8_64_scan${SCAN:-0}.log"
fi
