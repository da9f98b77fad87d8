"""The command lines' shared parts: the demo as main.py's default config, `--help` with every config
key, a sentence for a key that does not exist or a config file that fails, the log filter, and
the error wrapper every command uses (a user's error is one sentence, exit 2; --verbose adds the
traceback)."""

import difflib
import importlib.util
import os
import re
import sys
import traceback

from absl import flags
from absl import logging

from mura_jax import errors
from mura_jax.errors import UserError
from tfds_mura.mura.source import MuraDataError

FLAGS = flags.FLAGS
EXIT_USER_ERROR = 2
# Inside the package, so that any install (not only a checkout) has its default.
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'demo.py')
# What the user can fix: the project's errors (mura_jax.errors) and the dataset builder's.
USER_ERRORS = (UserError, MuraDataError)


def say_user_error(error: BaseException, verbose: bool, hint: str = '(--verbose prints the '
                   'traceback.)') -> int:
  """Prints a user's error as a sentence on stderr (re-raised with --verbose); returns the exit
  status."""
  if verbose:
    raise error
  logging.debug('%s', traceback.format_exc())
  print(f'error: {error}' + (f'\n{hint}' if hint else ''), file=sys.stderr)
  return EXIT_USER_ERROR


class QuietLibraries:
  """Keeps orbax's and TFDS's per-operation INFO lines out of the run's log (warnings pass)."""

  def __init__(self, verbose: bool = False):
    self._verbose = verbose

  def filter(self, record):
    noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'tensorflow_datasets', 'grain'))
    if noisy and not self._verbose and _says_disk_full(record):
      return False  # orbax's threads' tracebacks: run() says it in a sentence
    return record.levelno >= 30 or not noisy


def _says_disk_full(record) -> bool:
  try:
    text = record.getMessage()
  except Exception:  # pylint: disable=broad-except
    return False
  exc = record.exc_info[1] if record.exc_info else None
  return errors.is_disk_full(exc) or errors.is_disk_full(RuntimeError(text))


def parse_flags(argv: list[str], usage: str) -> list[str]:
  """absl's flag parser for main.py: the demo when no --config is given, --help with every key."""
  argv = _with_default_config(argv)
  sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv
  if any(a in ('-h', '--help', '--helpshort', '-?') for a in argv[1:]):
    print(help_text(_config_path(argv), usage))
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
  return [argv[0], f'--config={DEMO_CONFIG}', *argv[1:]]


def _config_path(argv: list[str]) -> str:
  for i, arg in enumerate(argv):
    if re.match(r'^--?config=', arg):
      return arg.split('=', 1)[1]
    if re.match(r'^--?config$', arg) and i + 1 < len(argv):
      return argv[i + 1]
  return DEMO_CONFIG


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


def help_text(config_path: str, usage: str) -> str:
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
      usage.strip(), '',
      'Flags:',
      '  --config=FILE      a config (repository configs/: ' + ', '.join(configs) + ')',
      '  --workdir=DIR      checkpoints, metrics, reports (required)',
      '  --verbose          tracebacks of input, config and workdir errors too',
      '  --helpfull         absl\'s own flags (logging, ...)', '',
      f'Config keys and their values in {config_path}:', keys])


def _repository_configs() -> list[str]:
  folder = os.path.join(os.path.dirname(os.path.dirname(DEMO_CONFIG)), '..', 'configs')
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
  path = os.path.join(os.path.dirname(DEMO_CONFIG), 'base.py')
  with open(path, encoding='utf-8') as f:
    return {m[1]: m[2].strip() for m in re.finditer(r'^\s*config\.(\S+) = [^#\n]*#(.*)$',
                                                      f.read(), re.M)}
