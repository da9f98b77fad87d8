"""The embedded default: the whole chain on a synthetic MURA, on a laptop CPU, in minutes.

    python -m mura_jax.main --workdir /tmp/mura-demo        # (this config is implied)

Makes a synthetic MURA-v1.1 in WORKDIR/synthetic if absent, builds the `mura` TFDS dataset in
WORKDIR/tfds, trains a small DenseNet from random initialisation at a small image size with the
paper's loss, optimiser and schedule, and evaluates the best checkpoint (WORKDIR/eval/validation/).
It lives inside the package so that it works from any install; configs/demo.py points here.
"""

from mura_jax.configs import base


def get_config():
  config = base.base_config()
  config.data.synthetic = True
  config.data.image_size = 64
  config.model.arch = 'custom'
  config.model.init = 'random'
  config.model.growth_rate = 12
  config.model.block_config = (2, 4, 4)
  config.model.num_init_features = 24
  config.optimizer.learning_rate = 1e-3
  config.train.global_batch_size = 32
  config.train.num_epochs = 8
  config.train.log_every_steps = 10
  config.evaluation.bootstrap_resamples = 2_000
  return config
