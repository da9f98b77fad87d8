"""mura-jax's entry point: `python -m mura_jax.main --config CONFIG --workdir DIR`.

`config.mode` picks the job:
  data      build the `mura` TFDS dataset (a synthetic MURA first where configured)
  train     train as in the paper, then evaluate the best checkpoint (`train.py`)
  evaluate  a checkpoint on a split, through `inference` (`evaluation.py`)
  cam       class activation maps of a checkpoint, their localisation measured (`cam.py`)
  export    a checkpoint's artifacts: jax.export, torchvision, SavedModel, model card (`export.py`)
Without --config the demo runs (mura_jax/configs/demo.py, the embedded default). Override any
config value on the command line: `--config.data.synthetic_seed=1`; `--help` lists them all.

A workdir remembers its run's config (WORKDIR/config.json): a rerun that changes anything that
changes results is refused, naming the keys, unless --config.allow_config_change=True says the
change is intended (it is then logged and recorded in the reports). Errors in the input, the
config or the workdir are printed as a sentence (exit 2); --verbose adds the traceback.
"""

import contextlib
import difflib
import importlib.util
import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# Inside the package, so that any install (not only a checkout) has its default.
_DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'demo.py')

config_flags.DEFINE_config_file('config', None, 'Python file with get_config() (default: the '
                                'demo, mura_jax/configs/demo.py).')
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics, reports (and the demo data) go.')
flags.DEFINE_bool('verbose', False, 'Print the traceback of errors in the input, config or '
                  'workdir too (for bug reports).')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS
EXIT_USER_ERROR = 2


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

  def __init__(self, verbose: bool = False):
    self._verbose = verbose

  def filter(self, record):
    noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'tensorflow_datasets', 'grain'))
    if noisy and not self._verbose and _says_disk_full(record):
      return False  # orbax's threads' tracebacks: run() says it in a sentence
    return record.levelno >= 30 or not noisy


def _says_disk_full(record) -> bool:
  from mura_jax import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    text = record.getMessage()
  except Exception:  # pylint: disable=broad-except
    return False
  exc = record.exc_info[1] if record.exc_info else None
  return checkpoints.is_disk_full(exc) or checkpoints.is_disk_full(RuntimeError(text))


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries(FLAGS.verbose))
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    run(FLAGS.config, FLAGS.workdir)
  except user_errors() as e:
    if FLAGS.verbose:
      raise
    logging.debug('%s', traceback.format_exc())
    _exit(f'error: {e}\n(--verbose prints the traceback.)')


def run(config, workdir):
  """Checks what can be checked before any computation, locks the workdir, then runs config.mode."""
  from mura_jax import checkpoints, parallel  # pylint: disable=g-import-not-at-top
  from mura_jax.configs import base  # pylint: disable=g-import-not-at-top
  from mura_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  if config.mode not in MODES:
    raise ConfigError(f'config.mode={config.mode!r}; expected one of {", ".join(MODES)}.')
  checkpoints.check_writable(workdir)  # not after an hour of evaluation
  base.check_values(config)
  if config.mode in ('train', 'evaluate', 'cam'):  # training evaluates at its end; cam thresholds
    from mura_jax import evaluation  # pylint: disable=g-import-not-at-top
    evaluation.check_config(config)
  checkpoints.check_named_files(config)
  if config.mode in ('evaluate', 'cam', 'export'):
    checkpoints.check_inference_config(workdir, config)
    checkpoints.check_has_checkpoints(workdir, config.mode)
  try:
    with contextlib.ExitStack() as lock:
      # One process: locked before JAX starts (on a GPU a second process would fail to allocate
      # before it could say why). Several: process 0 locks once all have started.
      distributed = _starts_distributed(config.get('distributed', 'auto'))
      if not distributed:
        lock.enter_context(_workdir_lock(workdir))
      parallel.initialize_distributed(config.get('distributed', 'auto'))
      if distributed:
        _lock_workdir_on_process_0(lock, workdir)
      _start(config)
      MODES[config.mode](config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    full = checkpoints.disk_full_error(workdir, e, config.mode)
    if full is None:
      raise
    raise full from e


def _workdir_lock(workdir):
  from mura_jax.errors import WorkdirError  # pylint: disable=g-import-not-at-top
  from tfds_mura import folder_lock  # pylint: disable=g-import-not-at-top
  return folder_lock.held(workdir, 'mura-jax run', error=WorkdirError)


def _starts_distributed(mode: str, env=None) -> bool:
  """Whether parallel.initialize_distributed(mode) will start jax.distributed (its rule)."""
  from mura_jax import parallel  # pylint: disable=g-import-not-at-top
  env = os.environ if env is None else env
  expected = parallel.expected_processes(env)
  return mode == 'on' or (mode == 'auto' and (bool(env.get('JAX_COORDINATOR_ADDRESS'))
                                               or (expected or 1) > 1))


def _lock_workdir_on_process_0(stack: contextlib.ExitStack, workdir) -> None:
  """Process 0 holds the workdir's lock for all (one lock file: every process writing its own
  would refuse the others); the others learn whether it got it, and stop with it if not."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from mura_jax.errors import WorkdirError  # pylint: disable=g-import-not-at-top
  refusal = None
  if jax.process_index() == 0:
    try:
      stack.enter_context(_workdir_lock(workdir))
    except WorkdirError as e:
      refusal = e
  if jax.process_count() > 1 and bool(multihost_utils.broadcast_one_to_all(
      np.int32(refusal is not None))):
    raise refusal or WorkdirError(
        f'{workdir} is in use by another run (process 0 found its lock, {workdir}/.mura-lock; its '
        'log names the holder). One workdir holds one run at a time.')
  if refusal is not None:
    raise refusal


def _start(config):
  """The process-wide set-up every mode shares: logs, malloc, the compilation cache."""
  from mura_jax import host, parallel  # pylint: disable=g-import-not-at-top
  if parallel.use_xla_cpu_convolutions():
    logging.info('XLA:CPU runs convolutions on its own kernels (%s).',
                 parallel.CPU_CONVOLUTION_FLAG)
  allocator = host.allocator_in_use()
  if allocator:
    logging.info('malloc: %s, for XLA:CPU\'s step buffers (host.py; MURA_JAX_MALLOC=system '
                 'turns it off).', allocator)
  cache = parallel.enable_compilation_cache(config.get('compilation_cache_dir', ''))
  logging.info('Compilation cache: %s', cache or 'off')
  logging.info('Config:\n%s', config)


def user_errors() -> tuple[type[Exception], ...]:
  """What the user can fix: the project's errors (mura_jax.errors) and the dataset builder's."""
  from mura_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from tfds_mura.mura.manual_download import MuraDataError  # pylint: disable=g-import-not-at-top
  return (UserError, MuraDataError)


# ------------------------------------------------------------------------------------------------
# The command line: the demo as the default config, --help with every key, a sentence for a key
# that does not exist.


def parse_flags(argv: list[str]) -> list[str]:
  argv = _with_default_config(argv)
  sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv
  if any(a in ('-h', '--help', '--helpshort', '-?') for a in argv[1:]):
    print(help_text(_config_path(argv)))
    sys.exit(0)
  config_file = _config_path(argv).partition(':')[0]
  if not os.path.isfile(config_file):
    _exit(f'error: --config {config_file}: no such config file. Pass a Python file with '
          f'get_config(): the repository\'s configs/ has {", ".join(_repository_configs())}; '
          'without --config the demo runs.')
  try:
    remaining = FLAGS(argv)
    FLAGS.config  # pylint: disable=pointless-statement  (ml_collections loads it here)
    return remaining
  except flags.Error as e:
    _exit(f'error: {e}\n`python -m mura_jax.main --help` lists the flags and config keys.')
  except (AttributeError, KeyError) as e:  # ml_collections, on an override of a missing key
    _exit(_unknown_key_message(argv) or f'error: {e}')
  except Exception as e:  # pylint: disable=broad-except
    line = _line_in(e, config_file)
    if line is None or '--verbose' in argv:
      raise
    _exit(f'error: --config {config_file} failed at line {line}: {type(e).__name__}: {e}\n'
          '(--verbose prints the traceback.)')


def _line_in(error: BaseException, path: str) -> int | None:
  """The line of `path` where `error` was raised (a config file's own bug), or None."""
  if isinstance(error, SyntaxError) and os.path.abspath(error.filename or '') == os.path.abspath(
      path):
    return error.lineno
  line = None
  for frame, lineno in traceback.walk_tb(error.__traceback__):
    if os.path.abspath(frame.f_code.co_filename) == os.path.abspath(path):
      line = lineno
  return line


def _exit(message: str):
  print(message, file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _with_default_config(argv: list[str]) -> list[str]:
  if any(re.match(r'^--?config(=|$)', a) for a in argv[1:]):
    return list(argv)
  return [argv[0], f'--config={_DEMO_CONFIG}', *argv[1:]]


def _config_path(argv: list[str]) -> str:
  for i, arg in enumerate(argv):
    if re.match(r'^--?config=', arg):
      return arg.split('=', 1)[1]
    if re.match(r'^--?config$', arg) and i + 1 < len(argv):
      return argv[i + 1]
  return _DEMO_CONFIG


def _load_config(path: str):
  """The ConfigDict of a config file (a `path:argument` passes `argument` to get_config)."""
  path, _, argument = path.partition(':')
  spec = importlib.util.spec_from_file_location('_mura_jax_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def _unknown_key_message(argv: list[str]) -> str | None:
  """error: the first --config.KEY that the config does not have, with the keys it has there."""
  config = _load_config(_config_path(argv))
  for arg in argv[1:]:
    match = re.match(r'^--?(?:no)?config\.([^=]+)', arg)
    if not match:
      continue
    node, walked = config, []
    for name in match[1].split('.'):
      if not hasattr(node, 'keys') or name not in node:
        where = '.'.join(walked) or 'the config'
        known = sorted(node.keys()) if hasattr(node, 'keys') else []
        close = difflib.get_close_matches(name, known, n=1)
        return (f'error: --config.{match[1]}: {where} has no key {name!r}'
                + (f' (did you mean {".".join(walked + close)}?)' if close else '')
                + f'. Its keys: {", ".join(known)}.\n`python -m mura_jax.main --help` lists '
                'every key with its default.')
      node, walked = node[name], walked + [name]
  return None


def help_text(config_path: str) -> str:
  """The module's docstring, the flags, and every config key with its value in CONFIG and the
  comment base.py gives it."""
  try:
    config = _load_config(config_path)
  except Exception as e:  # pylint: disable=broad-except
    keys = f'  (could not load {config_path}: {type(e).__name__}: {e})'
  else:
    comments = _base_comments()
    rows = [(key, repr(value), comments.get(key, '')) for key, value in _flatten(config)]
    width = max(len(k) + len(v) for k, v, _ in rows) + 5
    keys = '\n'.join(f'  {f"--config.{k}={v}":<{width + 10}} {c}'.rstrip() for k, v, c in rows)
  configs = _repository_configs()
  return '\n'.join([
      __doc__.strip(), '',
      'Flags:',
      '  --config=FILE      a config (repository configs/: ' + ', '.join(configs) + ')',
      '  --workdir=DIR      checkpoints, metrics, reports (required)',
      '  --verbose          tracebacks of input, config and workdir errors too',
      '  --helpfull         absl\'s own flags (logging, ...)', '',
      f'Config keys and their values in {config_path}:', keys])


def _repository_configs() -> list[str]:
  folder = os.path.join(os.path.dirname(os.path.dirname(_DEMO_CONFIG)), '..', 'configs')
  found = sorted(f for f in os.listdir(folder) if f.endswith('.py')) if (
      os.path.isdir(folder)) else []
  return found or ['densenet169.py', 'demo.py', '...']


def _flatten(config, prefix=''):
  for key in sorted(config.keys()):
    value = config[key]
    if hasattr(value, 'keys'):
      yield from _flatten(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _base_comments() -> dict[str, str]:
  """{key: its comment} from configs/base.py's `config.KEY = VALUE  # comment` lines."""
  path = os.path.join(os.path.dirname(_DEMO_CONFIG), 'base.py')
  with open(path, encoding='utf-8') as f:
    return {m[1]: m[2].strip() for m in re.finditer(r'^\s*config\.(\S+) = [^#\n]*#(.*)$',
                                                      f.read(), re.M)}


def entry_point():
  from mura_jax import host  # pylint: disable=g-import-not-at-top
  host.restart_with_allocator()  # first: it starts this process again
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  entry_point()
