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
  # 160 px and two dense blocks (output stride 8): 20 x 20 class activation maps, each cell
  # 26 px of a 512 px radiograph. At 64 px with three blocks the maps were 4 x 4 (pointing
  # 0.40); at 128 px, 16 x 16, most of the synthetic abnormalities are one to three cells across
  # and the peak fell a cell beside the box in most misses (pointing 0.46-0.64 over two seeds);
  # 160 px trains in about 30 s more on 2 cores (180 s against 148 s). BENCHMARKS.md, "What
  # limits the pointing game" and "Mirror-averaged maps".
  config.data.image_size = 160
  config.model.arch = 'custom'
  config.model.init = 'random'
  config.model.growth_rate = 12
  config.model.block_config = (2, 4)
  config.model.unrolled_blocks = 1  # the second block scanned, as densenet169's last two are
  config.model.num_init_features = 24
  config.optimizer.learning_rate = 1e-3
  # The synthetic MURA's subtle abnormalities among its confounders (synthetic_views.py) take
  # longer to learn than the old bright ones: 12 epochs, and the learning rate cut after two
  # epochs without a lower validation loss, not one (one noisy epoch at 1e-3 had cut it in the
  # third epoch). Measured: docs/cam.md and BENCHMARKS.md.
  config.optimizer.plateau_patience = 2
  config.train.global_batch_size = 32
  config.train.num_epochs = 12
  config.train.log_every_steps = 10
  config.evaluation.bootstrap_resamples = 2_000
  # After training: the best checkpoint alone (eval/validation/), then the later paper's
  # 5-best ensemble (eval/validation-ensemble/) with its paired comparison against it.
  config.evaluation.ensemble = 5
  config.after_training = 'evaluate,cam'  # the demo draws and measures its maps too
  # Maps averaged with their mirror's (inference/steps.py, view_maps): a trained network's plain
  # maps lean a cell to one side, the same side in most views (measured on this demo).
  config.cam.flip_average = True
  config.train.shuffled_labels_control = True  # the CAM report's control: training twice
  return config
