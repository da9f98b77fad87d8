#!/usr/bin/env bash
# A TPU VM (single host or pod slice): the same command on every host; jax.distributed detects the
# slice on TPU VMs. The dataset and the workdir must be readable from every host (gs:// paths work:
# the code uses etils.epath).
#
#   launch/tpu_vm.sh TPU_NAME ZONE gs://BUCKET/mura-run [extra --config.* flags]
#
# Setup once on all hosts: clone this repository to ~/mura-jax and `pip install -e ~/mura-jax
# "jax[tpu]"`, build the dataset into gs://BUCKET/tensorflow_datasets (python -m tfds_mura.build),
# and copy the ImageNet weights to ~/densenet169-b2777c0a.pth on every host.
set -euo pipefail
tpu=$1; zone=$2; workdir=$3; shift 3
gcloud compute tpus tpu-vm ssh "${tpu}" --zone "${zone}" --worker=all --command "
  cd ~/mura-jax && python -m mura_jax.main --config configs/densenet169.py --workdir ${workdir} \
    --config.data.data_dir=${workdir%/*}/tensorflow_datasets \
    --config.model.init=torchvision:$HOME/densenet169-b2777c0a.pth \
    --config.model.dtype=bfloat16 --config.train.global_batch_size=64 $*"
