"""The paper's recipe on several GPU nodes (launch/gpu_multinode.sbatch uses it).

    sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/gpu_multinode.sbatch \
        --workdir /shared/run --data-dir /shared/tensorflow_datasets \
        --weights /shared/densenet169-b2777c0a.pth

Overrides of configs/densenet169.py for many devices, every one stated:
  - bfloat16 compute (parameters, batch statistics and the loss stay float32);
  - 16 views per GPU: the global batch is 16 x the GPU count (4 nodes x 8 GPUs: 512), always a
    multiple of the device count;
  - the learning rate scaled by sqrt(global batch / 8), the square-root rule for Adam (Malladi
    et al., "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022): 1e-4
    at the paper's batch 8, 8e-4 at 512;
  - jax.distributed started from Slurm's variables (config.distributed=on; one process per GPU).
The plateau schedule, the loss and the augmentation are the paper's.
"""

from mura_jax.configs import base


def get_config():
  config = base.base_config()
  config.distributed = 'on'
  config.data.data_dir = ''   # a folder every node reads, given by the launch script
  config.data.num_workers = 8  # grain worker processes per node
  config.model.arch = 'densenet169'
  config.model.init = 'random'  # torchvision:PATH, given by the launch script
  config.model.dtype = 'bfloat16'
  config.model.scan_segment = 0  # unrolled blocks until the scanned ones are measured there
  config.train.per_device_batch_size = 16
  config.evaluation.per_device_batch_size = 64
  config.optimizer.lr_scaling = 'sqrt'
  return config
