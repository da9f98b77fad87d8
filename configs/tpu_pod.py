"""The paper's recipe on a TPU pod slice (launch/tpu_vm.sh uses it).

    launch/tpu_vm.sh train --tpu NAME --zone ZONE --workdir gs://BUCKET/run \
        --data-dir gs://BUCKET/tensorflow_datasets --weights /path/densenet169-b2777c0a.pth

Overrides of configs/densenet169.py for many devices, every one stated:
  - bfloat16 compute (parameters, batch statistics and the loss stay float32);
  - 8 views per device: the global batch is 8 x the number of TPU chips' cores (a v4-32 slice:
    16 devices, 128 views), always a multiple of the device count;
  - the learning rate scaled by sqrt(global batch / 8), 1e-4 at the paper's batch 8, 4e-4 at 128,
    and warmed up linearly over the first epoch (optimizer.lr_scaling='sqrt',
    warmup_epochs=1: mura_jax/configs/base.py gives each rule and its source);
  - grain workers from the host's cores (data.num_workers=-1, input_pipeline.worker_count);
  - jax.distributed started on every host (config.distributed=on): plain TPU VMs are not detected
    by an environment variable.
The plateau schedule, the loss and the augmentation are the paper's.
"""

from mura_jax.configs import base


def get_config():
  config = base.base_config()
  config.distributed = 'on'
  config.data.data_dir = ''   # gs://BUCKET/tensorflow_datasets, given by the launch script
  config.data.num_workers = -1  # grain workers: one per core of the host, at most 32
  config.model.arch = 'densenet169'
  config.model.init = 'random'  # torchvision:PATH on every host, given by the launch script
  config.model.dtype = 'bfloat16'
  config.model.scan_segment = 0  # unrolled blocks until the scanned ones are measured there
  config.train.per_device_batch_size = 8
  config.evaluation.per_device_batch_size = 32
  config.optimizer.lr_scaling = 'sqrt'
  config.optimizer.warmup_epochs = 1.0  # linear warm-up (Goyal et al. 2017; base.py)
  config.train.checkpoint_every_steps = 500
  return config
