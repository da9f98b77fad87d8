"""A workdir holds one run: its config (config.json, config_changes.json), its checkpoints
(checkpoints.py), its reports; one process (or one multi-host job) at a time.

Before any work every mode checks what it can (`preflight`): the workdir can be written, every
file the config names exists, evaluate, cam and export find a trained model and are not asked for
another one; then the run holds the workdir's lock (`locked`). A run that a full disk stops says
so in a sentence naming the last good checkpoint (`disk_full_error`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from etils import epath
from tfds_mura import folder_lock

from mura_jax import checkpoints
from mura_jax import errors
from mura_jax.checkpoints import BEST, LATEST
from mura_jax.configs import base
from mura_jax.errors import ConfigError, WorkdirError, write_problem
from mura_jax.models import densenet
from mura_jax.models import weights
from mura_jax.runtime import parallel


# ------------------------------------------------------------------------------------------------
# config.json: what the run is, and what a rerun may change.

# Keys that do not change what a run computes: where and how it runs, how often it logs, how many
# checkpoints it keeps, and the options of the modes after training (their reports record them).
_FREE_KEYS = ('mode', 'after_training', 'distributed', 'compilation_cache_dir',
              'allow_config_change',
              'data.num_workers', 'data.build_workers', 'data.manual_dir',
              'model.scan_segment', 'model.unrolled_blocks', 'model.remat',
              'train.per_device_batch_size',
              'train.log_every_steps', 'train.checkpoint_every_steps', 'train.keep_checkpoints',
              'train.keep_best', 'train.shuffled_labels_control',
              'evaluation.', 'cam.', 'export.')
# Evaluate, cam and export run with the workdir's config (`config_of_run`); of it they may change
# only their own keys (a prefix ending in '.' names a section) and where the data are ...
_MODE_KEYS = {'evaluate': ('evaluation.', 'data.body_parts'), 'cam': ('cam.', 'evaluation.'),
              'export': ('export.', 'cam.flip_average')}  # how the export's maps are made
_DATA_KEYS = ('data.data_dir', 'data.manual_dir')
# ... and where and how they run, always the command line's (the workdir's says how training ran).
_RUNTIME_KEYS = ('mode', 'after_training', 'distributed', 'compilation_cache_dir',
                 'allow_config_change', 'data.num_workers', 'data.build_workers',
                 'model.scan_segment', 'model.unrolled_blocks')
# The shuffled-labels control's own workdir inside a run's (training/controls.py; read by CAM).
SHUFFLED_LABELS_CONTROL = 'controls/shuffled_labels'


def write_config(workdir, config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json: the full config of the run, for people and for `inference`. Written
  whole and renamed into place: another process reading it never sees half a file."""
  if jax.process_index() == 0:
    path = epath.Path(workdir) / 'config.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f'.config.json.partial-{os.getpid()}'
    partial.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
    partial.replace(path)


def read_config(workdir) -> ml_collections.ConfigDict | None:
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    return None
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def config_differences(written, config) -> dict[str, tuple[Any, Any]]:
  """{key: (value in the workdir, value now)} over the keys that change results. A key the
  workdir's config.json predates is no change while it keeps its default (a new key's default
  is the behaviour before it existed)."""
  before, now, defaults = _flat(written), _flat(config), _flat(base.base_config())
  missing = object()
  return {key: (before.get(key, '(absent)'), now.get(key, '(absent)'))
          for key in sorted(set(before) | set(now))
          if not _named(key, _FREE_KEYS) and before.get(key, missing) != now.get(key, missing)
          and not (key not in before and key in defaults and now.get(key) == defaults[key])}


def _flat(config) -> dict[str, Any]:
  """{'section.key': value} of a config, through JSON (a tuple and its list compare equal)."""
  def flat(tree, prefix=''):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from flat(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value
  return dict(flat(json.loads(config.to_json_best_effort())))


def _changes_table(changes) -> str:
  return '\n'.join(f'  {key}: {before!r} in the workdir, {now!r} now'
                   for key, (before, now) in changes.items())


def record_config(workdir, config: ml_collections.ConfigDict, *, continuing: bool) -> None:
  """Writes WORKDIR/config.json at the start of training. A run `continuing` the workdir's
  checkpoints with a config that changes results is refused (the last epochs would train on a
  mix), unless config.allow_config_change: then the change is logged and appended to
  WORKDIR/config_changes.json, which the reports include."""
  written = read_config(workdir)
  if jax.process_count() > 1:  # every host has read it before host 0 writes the new one
    multihost_utils.sync_global_devices('mura_jax: config.json read')
  changes = config_differences(written, config) if written is not None and continuing else {}
  if changes and not config.get('allow_config_change', False):
    raise ConfigError(
        f'{workdir} holds a run trained with another config; continuing it would mix the two:\n'
        f'{_changes_table(changes)}\nRun again with the workdir\'s values, use a new --workdir, '
        'or pass --config.allow_config_change=True if the change is intended (it is recorded in '
        'the reports).')
  if changes:
    logging.warning('Continuing %s with a changed config (allow_config_change):\n%s', workdir,
                    _changes_table(changes))
    if jax.process_index() == 0:
      path = epath.Path(workdir) / 'config_changes.json'
      history = json.loads(path.read_text()) if path.exists() else []
      history.append({'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                      'changes': {k: {'before': b, 'after': a} for k, (b, a) in changes.items()}})
      path.write_text(json.dumps(history, indent=2) + '\n')
  write_config(workdir, config)


def config_changes(workdir) -> list[dict]:
  """The intended config changes recorded in the workdir (`record_config`), oldest first."""
  path = epath.Path(workdir) / 'config_changes.json'
  return json.loads(path.read_text()) if path.exists() else []


def _named(key: str, names) -> bool:
  return any(key == n or (n.endswith('.') and key.startswith(n)) for n in names)


def config_of_run(workdir, config: ml_collections.ConfigDict,
                  given=None) -> ml_collections.ConfigDict:
  """The config evaluate, cam and export run with: the workdir's config.json (what the run was
  trained with, its command line's overrides included), so that none has to be repeated. Of the
  command line's `config` they take where and how they run (`_RUNTIME_KEYS`) and, where `given`
  (the keys set with --config.KEY=VALUE; None, a config built in code: its keys that differ from
  configs/base.py's defaults), their own keys
  (`_MODE_KEYS`, `_DATA_KEYS`). Another key given with another value than the run's is refused
  (ConfigError naming it): the model and its preprocessing are the checkpoints'. Other modes, or
  a workdir without config.json: `config` as it is."""
  written = read_config(workdir) if config.mode in _MODE_KEYS else None
  if written is None:
    return config
  before, now = _flat(written), _flat(config)
  owned = _RUNTIME_KEYS + _DATA_KEYS + _MODE_KEYS[config.mode]
  if given is None:  # a config built in code: the keys it sets away from the defaults
    defaults = _flat(base.base_config())
    given = {k for k in now if k not in defaults or now[k] != defaults[k]}
  given = set(given) & set(now)
  refused = {k: (before[k], now[k]) for k in sorted(given) if not _named(k, owned)
             and k in before and before[k] != now[k]}
  if refused:
    own = ', '.join(n + ('*' if n.endswith('.') else '') for n in _MODE_KEYS[config.mode])
    raise ConfigError(
        f'{config.mode} runs with the config the run in {workdir} was trained with (its '
        f'config.json), and may change only its own keys ({own}, {", ".join(_DATA_KEYS)}); this '
        f'command line changes {", ".join(f"--config.{k}" for k in refused)}:\n'
        f'{_changes_table(refused)}\nDrop {"it" if len(refused) == 1 else "them"} (the '
        'checkpoints keep their model and preprocessing), or train a run with '
        f'{"it" if len(refused) == 1 else "them"} into a new --workdir.')
  merged = {k: v if (_named(k, _RUNTIME_KEYS) or k not in before
                     or (k in given and _named(k, owned))) else before[k]
            for k, v in now.items()}
  taken = sorted(k for k in merged if merged[k] != now[k])
  if taken:
    logging.info('%s uses the config of the run in %s (config.json); it differs from this '
                 "command line's config file in: %s", config.mode, workdir, ', '.join(taken))
  return _unflat(merged, config)


def _unflat(flat: dict[str, Any], like: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A ConfigDict of `flat` values shaped as `like` (its tuples stay tuples)."""
  tree = like.copy_and_resolve_references().to_dict()
  for key, value in flat.items():
    *sections, name = key.split('.')
    node = tree
    for section in sections:
      node = node[section]
    node[name] = tuple(value) if isinstance(node.get(name), tuple) and isinstance(
        value, list) else value
  return ml_collections.ConfigDict(tree)


# The files a config may name, what each should be (for the message when it is missing).
_NAMED_FILES = {
    'evaluation.readers': "a CSV `study,<reader>,...` of radiologists' labels",
    'evaluation.threshold_from': 'a report.json (e.g. WORKDIR/eval/validation/report.json)',
    'evaluation.compare': 'another workdir or a predictions CSV',
    'cam.annotations': 'a boxes CSV `image_path,abnormality,x0,y0,x1,y1`',
    'cam.confounders': 'a boxes CSV `image_path,confounder,x0,y0,x1,y1`',
}


def check_named_files(config: ml_collections.ConfigDict) -> None:
  """Every file or folder the config names exists, and the weights file for training: checked
  before any work, not after an hour of it."""
  for key, what in _NAMED_FILES.items():
    section, name = key.split('.')
    value = config.get(section, {}).get(name, '') if section in config else ''
    if value and not epath.Path(value).exists():
      raise ConfigError(f'--config.{key}={value}: no such file or folder. It should be {what}; '
                        'fix the path, or leave the key empty.')
  kind, _, path = config.model.init.partition(':')
  if config.mode == 'train' and kind in ('torchvision', 'keras') and path:
    weights.check_weights_file(path, densenet.create_model(checkpoints.model_signature(config)),
                               kind)
  if config.mode == 'export' and config.export.get('dir'):
    check_writable(epath.Path(config.export.dir).parent, '--config.export.dir')


def check_writable(folder, flag: str = '--workdir') -> None:
  """Fails now, with a sentence, when `folder` cannot be written: not after the work."""
  e = write_problem(folder)
  if isinstance(e, ImportError):
    raise WorkdirError(f'Cannot write to {folder}: {errors.GCS_INSTALL}.') from e
  if e is not None:
    raise WorkdirError(
        f'Cannot write to {folder} ({type(e).__name__}: {getattr(e, "strerror", None) or e}). '
        + ('Every mode writes its checkpoints, reports or outputs in the workdir: pass a --workdir '
           'you can write to (copy a finished run there to evaluate it).' if flag == '--workdir'
           else f'Pass a {flag} you can write to.')) from e


# ------------------------------------------------------------------------------------------------
# Checked before any work.


def preflight(config, workdir, check_job=None) -> None:
  """What every mode checks before any computation: the workdir can be written, the config's
  values (configs.base), the job's own (`check_job(config)`), the files the config names, and
  for evaluate, cam and export a trained model in the workdir of the model they are asked for."""
  check_writable(workdir)  # not after an hour of evaluation
  base.check_values(config)
  if check_job is not None:
    check_job(config)
  check_named_files(config)
  if config.mode in _MODE_KEYS:
    checkpoints.check_has_checkpoints(workdir, config.mode)


def disk_full_error(workdir, error: BaseException, mode: str) -> WorkdirError | None:
  """The sentence for a run stopped by a full disk; None for any other error."""
  if not errors.is_disk_full(error):
    return None
  resumable = mode == 'train' and checkpoints.steps_of(epath.Path(workdir) / LATEST)
  again = 'run the same command again' + (': training resumes from it' if resumable else '')
  partial = any((epath.Path(workdir) / name).exists() and any(
      (epath.Path(workdir) / name).glob(checkpoints.PARTIAL_SAVE)) for name in (LATEST, BEST))
  return WorkdirError(
      f'The disk holding {workdir} is full (No space left on device): the {mode} run stopped; '
      f'{checkpoints.last_good_checkpoint(workdir)}. Free space there (or copy the workdir to a '
      f'larger disk and pass that --workdir) and {again}'
      + ('; the unfinished save is removed at the start.' if partial else '.'))


# ------------------------------------------------------------------------------------------------
# One run at a time.

@contextlib.contextmanager
def held(config, workdir):
  """Holds the workdir's lock while the run starts (runtime.start) and works. One process: locked
  before JAX starts (on a GPU a second process would fail to allocate before it could say why).
  Several: process 0 locks once all have started. A run stopped by a full disk ends with a
  sentence naming the last good checkpoint."""
  with contextlib.ExitStack() as stack:
    mode = config.get('distributed', 'auto')
    distributed = parallel.starts_distributed(mode)
    if not distributed:
      stack.enter_context(lock(workdir))
    parallel.initialize_distributed(mode)
    if distributed:
      lock_on_process_0(stack, workdir)
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      full = disk_full_error(workdir, e, config.mode)
      if full is None:
        raise
      raise full from e


def lock(workdir):
  return folder_lock.held(workdir, 'mura-jax run', error=WorkdirError)


def lock_on_process_0(stack: contextlib.ExitStack, workdir) -> None:
  """Process 0 holds the workdir's lock for all (one lock file: every process writing its own
  would refuse the others); the others learn whether it got it, and stop with it if not."""
  refusal = None
  if jax.process_index() == 0:
    try:
      stack.enter_context(lock(workdir))
    except WorkdirError as e:
      refusal = e
  if jax.process_count() > 1 and bool(multihost_utils.broadcast_one_to_all(
      np.int32(refusal is not None))):
    raise refusal or WorkdirError(
        f'{workdir} is in use by another run (process 0 found its lock, {workdir}/.mura-lock; its '
        'log names the holder). One workdir holds one run at a time.')
  if refusal is not None:
    raise refusal
