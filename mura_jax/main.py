"""mura-jax's entry point: `python -m mura_jax.main --config CONFIG --workdir DIR`.

`config.mode` picks the job:
  data      build the `mura` TFDS dataset (a synthetic MURA first where configured)
  train     train as in the paper, then what config.after_training lists (evaluate, cam)
  evaluate  a checkpoint on a split, through `inference` (evaluation/evaluate.py)
  cam       class activation maps of a checkpoint, their localisation measured
  export    a checkpoint's artifacts: jax.export, torchvision, SavedModel, model card
Without --config the demo runs (mura_jax/configs/demo.py, the embedded default). Override any
config value on the command line: `--config.data.synthetic_seed=1`; `--help` lists them all.

A workdir remembers its run's config (WORKDIR/config.json): a rerun that changes results is
refused, naming the keys, unless --config.allow_config_change=True (logged, and recorded in the
reports). Evaluate, cam and export run with that config: they may change only their own keys.
Errors in the input, config or workdir are a sentence (exit 2); --verbose adds the traceback.
"""

from mura_jax.runtime import host
if __name__ == '__main__':  # first, before the imports below (3 s): it starts this process again
  host.restart_with_allocator()  # with the malloc XLA:CPU's buffers want (host.py)

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mura_jax import cli
from mura_jax import workdir as workdir_lib
from mura_jax.errors import ConfigError
from mura_jax.runtime import start

config_flags.DEFINE_config_file('config', None, 'Python file with get_config() (default: the '
                                'demo, mura_jax/configs/demo.py).')
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics, reports (and the demo data) go.')
flags.DEFINE_bool('verbose', False, 'Print the traceback of errors in the input, config or '
                  'workdir too (for bug reports).')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS

# Each mode's job: a module with run(config, workdir) and, where it has values of its own to
# check before any work, check(config). Imported when its mode runs.
JOBS = {'data': 'mura_jax.data.dataset', 'train': 'mura_jax.training.train',
        'evaluate': 'mura_jax.evaluation.evaluate', 'cam': 'mura_jax.interpretation.cam',
        'export': 'mura_jax.serving.export'}


def _run_job(mode: str, config, workdir):
  return importlib.import_module(JOBS[mode]).run(config, workdir)


MODES = {mode: functools.partial(_run_job, mode) for mode in JOBS}


def run(config, workdir, given=None):
  """Checks what can be checked before any computation, locks the workdir, then runs config.mode
  and, after training, the jobs config.after_training lists. Evaluate, cam and export run with
  the workdir's config, changed only in their keys `given` (workdir.config_of_run)."""
  start.before_jax()
  if config.mode not in MODES:
    raise ConfigError(f'config.mode={config.mode!r}; expected one of {", ".join(MODES)}.')
  config = workdir_lib.config_of_run(workdir, config, given)
  jobs = [config.mode] + (after_training(config) if config.mode == 'train' else [])
  checks = [getattr(importlib.import_module(JOBS[m]), 'check', None) for m in jobs]
  workdir_lib.preflight(config, workdir, lambda c: [check(c) for check in checks if check])
  with workdir_lib.held(config, workdir):
    start.start(config)
    if MODES[config.mode](config, workdir) == 'done':  # training finished: what follows it
      for mode in jobs[1:]:
        MODES[mode](config, workdir)


def after_training(config) -> list[str]:
  """The modes that run after a finished training, from config.after_training ('evaluate,cam')."""
  jobs = [m.strip() for m in str(config.get('after_training', 'evaluate')).split(',') if m.strip()]
  unknown = [m for m in jobs if m not in ('evaluate', 'cam')]
  if unknown:
    raise ConfigError(f'--config.after_training={config.after_training}: {", ".join(unknown)} '
                      'cannot run after training; list evaluate and/or cam (or leave it empty).')
  return jobs


def main(argv):
  logging.get_absl_handler().addFilter(cli.QuietLibraries(FLAGS.verbose))
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    run(FLAGS.config, FLAGS.workdir, config_flags.get_override_values(FLAGS['config']))
  except cli.USER_ERRORS as e:
    raise SystemExit(cli.say_user_error(e, FLAGS.verbose)) from None


def entry_point():
  app.run(main, flags_parser=functools.partial(cli.parse_flags, usage=__doc__))


if __name__ == '__main__':
  entry_point()
