"""The paper's recipe on the real MURA-v1.1.

    python -m mura_jax.main --config configs/densenet169.py --workdir DIR \\
        --config.data.data_dir ~/tensorflow_datasets \\
        --config.model.init torchvision:/path/to/densenet169-b2777c0a.pth

Needs the `mura` dataset built (python -m tfds_mura.build) and torchvision's ImageNet weights
(https://download.pytorch.org/models/densenet169-b2777c0a.pth; nothing is downloaded at run time).
On accelerators add --config.model.dtype=bfloat16.
"""

import os

from mura_jax.configs import base


def get_config():
  config = base.base_config()
  config.data.data_dir = os.path.expanduser('~/tensorflow_datasets')
  config.data.num_workers = -1  # grain workers: one per core, at most 32
  config.model.arch = 'densenet169'
  config.model.init = 'torchvision:' + os.path.expanduser('~/weights/densenet169-b2777c0a.pth')
  return config
