"""mura-jax's entry point: `python -m mura_jax.main --config CONFIG --workdir DIR`.

`config.mode` picks the job:
  data      build the `mura` TFDS dataset (a synthetic MURA first where configured)
  train     train as in the paper, then evaluate the best checkpoint (`train.py`)
  evaluate  a checkpoint on a split, through `inference` (`evaluation.py`)
  cam       class activation maps of a checkpoint, their localisation measured (`cam.py`)
  export    a checkpoint's artifacts: jax.export, torchvision, SavedModel, model card (`export.py`)
Without --config the demo runs (mura_jax/configs/demo.py, the embedded default). Override any
config value on the command line: `--config.data.synthetic_seed=1`.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# Inside the package, so that any install (not only a checkout) has its default.
_DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'demo.py')

config_flags.DEFINE_config_file('config', _DEMO_CONFIG, 'Python file with get_config().')
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics, reports (and the demo data) go.')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def run_data(config, workdir):
  """Prepares the dataset (synthetic if configured) and prints what is in it."""
  from mura_jax import data  # pylint: disable=g-import-not-at-top
  from tfds_mura import build  # pylint: disable=g-import-not-at-top
  builder = data.prepare_dataset(config, workdir)
  print(f'\nmura {builder.info.version} ({builder.info.file_format.value}) in {builder.data_dir}')
  print(build.summary_table(builder.info))


def run_train(config, workdir):
  """Prepares the data (synthetic if configured), trains, then evaluates the best checkpoint."""
  from mura_jax import data, evaluation, train  # pylint: disable=g-import-not-at-top
  if config.data.synthetic:
    data.prepare_dataset(config, workdir)
  summary = train.train_and_evaluate(config, workdir)
  if summary['status'] == 'done' and evaluation.evaluates_an_ensemble(config):
    run_evaluate_ensemble_after_training(config, workdir)
  elif summary['status'] == 'done':
    run_evaluate(config, workdir)
  if summary['status'] == 'done':
    if config.cam.after_training:
      run_cam(config, workdir)


def run_evaluate(config, workdir):
  """Evaluates a checkpoint (config.evaluation.checkpoint: best, latest or a step)."""
  from mura_jax import evaluation  # pylint: disable=g-import-not-at-top
  return evaluation.evaluate_checkpoint(config, workdir)


def run_evaluate_ensemble_after_training(config, workdir):
  """The best checkpoint alone (eval/<split>/: what predict, CAM and export read), then the
  ensemble of the best checkpoints kept (eval/<split>-ensemble/, compared with it)."""
  from mura_jax import evaluation  # pylint: disable=g-import-not-at-top
  run_evaluate(evaluation.single_checkpoint(config), workdir)
  ensemble = evaluation.ensemble_of_kept(config, workdir)
  if ensemble is not None:
    run_evaluate(ensemble, workdir)


def run_cam(config, workdir):
  """Class activation maps of a checkpoint on a split, and how well they localise (cam.py)."""
  from mura_jax import cam  # pylint: disable=g-import-not-at-top
  return cam.run(config, workdir)


def run_export(config, workdir):
  """A checkpoint's artifacts for use without this project (export.py): jax.export, torchvision
  safetensors, TF SavedModel, model card."""
  from mura_jax import export  # pylint: disable=g-import-not-at-top
  return export.run(config, workdir)


MODES = {'data': run_data, 'train': run_train, 'evaluate': run_evaluate, 'cam': run_cam,
         'export': run_export}


class _QuietLibraries:
  """Keeps orbax's and TFDS's per-operation INFO lines out of the run's log (warnings pass)."""

  def filter(self, record):
    noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'tensorflow_datasets', 'grain'))
    return record.levelno >= 30 or not noisy


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if config.mode not in MODES:
    raise app.UsageError(f'config.mode={config.mode!r}; expected one of {sorted(MODES)}')
  from mura_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(config.get('distributed', 'auto'))
  cache = parallel.enable_compilation_cache(config.get('compilation_cache_dir', ''))
  logging.info('Compilation cache: %s', cache or 'off')
  logging.info('Config:\n%s', config)
  MODES[config.mode](config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
