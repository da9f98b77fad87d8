"""The embedded default: the whole chain on a synthetic MURA, on a laptop CPU, in minutes.

    python -m mura_jax.main --workdir /tmp/mura-demo        # (--config configs/demo.py is implied)

Makes a synthetic MURA-v1.1 in WORKDIR/synthetic if absent, builds the `mura` TFDS dataset in
WORKDIR/tfds, and prints what was built.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.mode = 'data'

  config.data = ml_collections.ConfigDict()
  # Empty: WORKDIR/synthetic (made if absent) and WORKDIR/tfds.
  config.data.manual_dir = ''
  config.data.data_dir = ''
  config.data.synthetic = True
  config.data.synthetic_studies_per_part = 60
  config.data.synthetic_valid_studies_per_part = 40
  config.data.synthetic_seed = 0
  config.data.build_workers = 0  # 0: all cores
  return config
