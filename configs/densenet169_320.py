"""The later MURA paper's recipe (arXiv v3 onwards, the leaderboard's baseline) on real MURA-v1.1.

    python -m mura_jax.main --config configs/densenet169_320.py --workdir DIR \\
        --config.data.data_dir ~/tensorflow_datasets \\
        --config.model.init torchvision:/path/to/densenet169-b2777c0a.pth

As configs/densenet169.py (the first version: 224 x 224, one model: F1 0.857), but 320 x 320
inputs and, at evaluation, the ensemble of the 5 checkpoints with the lowest validation loss
(`mura_jax.evaluation.ensembles`: their view probabilities averaged, then the study mean); the same optimiser
and schedule. That version reports Cohen's kappa 0.705 (95% CI 0.700-0.710) and AUROC 0.929 on the
hidden test set. After training, the best single checkpoint is evaluated into
WORKDIR/eval/validation/ and the ensemble into WORKDIR/eval/validation-ensemble/, with the paired
comparison of the two. On accelerators add --config.model.dtype=bfloat16.
"""

import os

from mura_jax.configs import base


def get_config():
  config = base.base_config()
  config.data.data_dir = os.path.expanduser('~/tensorflow_datasets')
  config.data.num_workers = -1  # grain workers: one per core, at most 32
  config.data.image_size = 320
  config.model.arch = 'densenet169'
  config.model.init = 'torchvision:' + os.path.expanduser('~/weights/densenet169-b2777c0a.pth')
  config.train.keep_best = 5
  config.evaluation.ensemble = 5
  return config
