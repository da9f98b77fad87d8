"""The paper's recipe on several GPU nodes (launch/gpu_multinode.sbatch uses it).

    sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/gpu_multinode.sbatch \
        --workdir /shared/run --data-dir /shared/tensorflow_datasets \
        --weights /shared/densenet169-b2777c0a.pth

Overrides of configs/densenet169.py for many devices, every one stated:
  - bfloat16 compute (parameters, batch statistics and the loss stay float32);
  - 16 views per GPU: the global batch is 16 x the GPU count (4 nodes x 8 GPUs: 512), always a
    multiple of the device count;
  - the learning rate scaled by sqrt(global batch / 8), 1e-4 at the paper's batch 8, 8e-4 at 512,
    and warmed up linearly over the first epoch (optimizer.lr_scaling='sqrt',
    warmup_epochs=1: mura_jax/configs/base.py gives each rule and its source);
  - grain workers from the host's cores (data.num_workers=-1, input_pipeline.worker_count);
  - jax.distributed started from Slurm's variables (config.distributed=on; one process per GPU).
The plateau schedule, the loss and the augmentation are the paper's.
"""

from mura_jax.configs import base


def get_config():
  config = base.base_config()
  config.distributed = 'on'
  config.data.data_dir = ''   # a folder every node reads, given by the launch script
  config.data.num_workers = -1  # grain workers: the node's cores shared by its tasks, at most 32
  config.model.arch = 'densenet169'
  config.model.init = 'random'  # torchvision:PATH, given by the launch script
  config.model.dtype = 'bfloat16'
  config.model.scan_segment = 0  # unrolled blocks until the scanned ones are measured there
  config.train.per_device_batch_size = 16
  config.evaluation.per_device_batch_size = 64
  config.optimizer.lr_scaling = 'sqrt'
  config.optimizer.warmup_epochs = 1.0  # linear warm-up (Goyal et al. 2017; base.py)
  return config
