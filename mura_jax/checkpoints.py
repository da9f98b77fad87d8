"""Checkpoints of a run (orbax): what is kept, what each holds, how it is restored.

WORKDIR/
  config.json     the full config of the run (written at every start of training); a rerun
                  that changes results is refused (`record_config`, `check_inference_config`)
  config_changes.json  the changes a rerun made on purpose (--config.allow_config_change=True)
  checkpoints/    the latest `train.keep_checkpoints` steps: the whole TrainState (Adam's moments,
                  the plateau state, the dropout key) and `progress` (epoch, batch, the input
                  position): an exact resume after a preemption.
  best/           the `train.keep_best` epochs with the lowest validation loss (the later MURA
                  paper ensembles its 5 best): only what inference needs, the network's
                  `variables` (params, batch_stats; a third of a TrainState) and the `spec`.

The spec (JSON) says what a checkpoint is: the model (architecture, `model_signature`), the
preprocessing it was trained with (`preprocessing.Preprocessing`), its step, epoch and validation
loss. A checkpoint is restored only into the model its spec names (`CheckpointMismatchError`
otherwise), and replicated over the mesh it is restored onto: a checkpoint saved on 2 hosts x 2
devices loads on 1 device and vice versa. Workdirs may be gs:// paths (etils.epath throughout).
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mura_jax import preprocessing as preprocessing_lib
from mura_jax.models import densenet
from mura_jax.errors import ConfigError, UserError, WorkdirError, write_problem

SPEC_VERSION = 1
LATEST, BEST = 'checkpoints', 'best'
# orbax writes a step into STEP.orbax-checkpoint-tmp[-N] and renames it when complete; a run
# killed or stopped by a full disk while saving leaves that folder behind.
_PARTIAL_SAVE = '*.orbax-checkpoint-tmp*'


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint in the workdir was written for another model."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """The asked-for checkpoint is not in the workdir; the message lists what is."""


# ------------------------------------------------------------------------------------------------
# What a checkpoint is.


def model_signature(config: ml_collections.ConfigDict) -> dict:
  """What a checkpoint must match to be restored into this config's model."""
  m = config.model
  signature = {'arch': m.arch, 'in_channels': m.in_channels, 'num_classes': 1}
  if m.arch == 'custom':
    signature.update(growth_rate=m.growth_rate, block_config=list(m.block_config),
                     num_init_features=m.num_init_features, bn_size=m.bn_size)
  return signature


def create_model(signature: dict, *, dtype: Any = 'float32', drop_rate: float = 0.0,
                 remat: bool = False, scan_segment: int = 8,
                 unrolled_blocks: int = 2) -> densenet.DenseNet:
  """The network a signature describes; dtype, dropout, remat and scanning are run-time choices
  (scan_segment, unrolled_blocks: configs/base.py's defaults; the variables are the same either
  way)."""
  kwargs = dict(num_classes=signature['num_classes'], drop_rate=drop_rate, remat=remat,
                scan_segment=scan_segment, unrolled_blocks=unrolled_blocks,
                dtype=jax.numpy.dtype(dtype))
  if signature['arch'] == 'custom':  # small DenseNets for the demo and the tests
    return densenet.DenseNet(growth_rate=signature['growth_rate'],
                             block_config=tuple(signature['block_config']),
                             num_init_features=signature['num_init_features'],
                             bn_size=signature['bn_size'], **kwargs)
  return densenet.create_model(signature['arch'], **kwargs)


def spec(config: ml_collections.ConfigDict, **fields) -> dict:
  """The spec of a checkpoint of this config (model, preprocessing) plus `fields` (step, ...)."""
  return {'spec_version': SPEC_VERSION, 'model': model_signature(config),
          'preprocessing': preprocessing_lib.Preprocessing.from_config(config).to_dict(), **fields}


def check_model(found: dict | None, expected: dict, where: str) -> None:
  """Raises CheckpointMismatchError naming the differing keys."""
  if found != expected:
    found = found or {}
    diff = {k: (found.get(k), expected.get(k)) for k in sorted(set(found) | set(expected))
            if found.get(k) != expected.get(k)}
    raise CheckpointMismatchError(
        f'The checkpoint {where} was written for another model (key: (checkpoint, config)): '
        f'{diff}. Use a new --workdir, or the config it was trained with.')


# Keys that do not change what a run computes: where and how it runs, how often it logs, how many
# checkpoints it keeps, and the options of the modes after training (their reports record them).
_FREE_KEYS = ('mode', 'distributed', 'compilation_cache_dir', 'allow_config_change',
              'data.num_workers', 'data.build_workers', 'data.manual_dir',
              'model.scan_segment', 'model.unrolled_blocks', 'train.per_device_batch_size',
              'train.log_every_steps', 'train.checkpoint_every_steps', 'train.keep_checkpoints',
              'train.keep_best',
              'evaluation.', 'cam.', 'export.')
# What evaluate, cam and export take from the checkpoints themselves (their spec), not the config.
_INFERENCE_KEYS = ('data.image_size', 'data.resize', 'model.arch', 'model.in_channels',
                   'model.dtype', 'model.growth_rate', 'model.block_config',
                   'model.num_init_features', 'model.bn_size')


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


def config_differences(written, config, keys=None) -> dict[str, tuple[Any, Any]]:
  """{key: (value in the workdir, value now)} over the keys that change results (or `keys`)."""
  def flat(tree, prefix=''):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from flat(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value
  # Both through JSON, so that a tuple and the list it was written as compare equal.
  before = dict(flat(json.loads(written.to_json_best_effort())))
  now = dict(flat(json.loads(config.to_json_best_effort())))
  missing = object()
  return {key: (before.get(key, '(absent)'), now.get(key, '(absent)'))
          for key in sorted(set(before) | set(now))
          if (key in keys if keys is not None else not key.startswith(_FREE_KEYS))
          and before.get(key, missing) != now.get(key, missing)}


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
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
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


def check_inference_config(workdir, config: ml_collections.ConfigDict) -> None:
  """Evaluate, cam and export take the model and its preprocessing from the checkpoints' spec;
  a command line that asks for another image size, resize or model would be silently ignored,
  so it is an error."""
  written = read_config(workdir)
  if written is None:
    return
  changes = config_differences(written, config, keys=_INFERENCE_KEYS)
  if changes:
    raise ConfigError(
        f'The checkpoints in {workdir} were trained with another model or preprocessing than '
        f'this command asks for:\n{_changes_table(changes)}\n{config.mode} uses the checkpoints\' '
        'own (their spec); drop these overrides, or pass the config the run was trained with.')


# The files a config may name, what each should be (for the message when it is missing).
_NAMED_FILES = {
    'evaluation.readers': "a CSV `study,<reader>,...` of radiologists' labels",
    'evaluation.threshold_from': 'a report.json (e.g. WORKDIR/eval/validation/report.json)',
    'evaluation.compare': 'another workdir or a predictions CSV',
    'cam.annotations': 'a boxes CSV `image_path,abnormality,x0,y0,x1,y1`',
}


def check_named_files(config: ml_collections.ConfigDict) -> None:
  """Every file or folder the config names exists, and the weights file for training: checked
  before any work, not after an hour of it."""
  from mura_jax.models import weights  # pylint: disable=g-import-not-at-top
  for key, what in _NAMED_FILES.items():
    section, name = key.split('.')
    value = config.get(section, {}).get(name, '') if section in config else ''
    if value and not epath.Path(value).exists():
      raise ConfigError(f'--config.{key}={value}: no such file or folder. It should be {what}; '
                        'fix the path, or leave the key empty.')
  kind, _, path = config.model.init.partition(':')
  if config.mode == 'train' and kind in ('torchvision', 'keras') and path:
    weights.check_weights_file(path, create_model(model_signature(config)), kind)
  if config.mode == 'export' and config.export.get('dir'):
    check_writable(epath.Path(config.export.dir).parent, '--config.export.dir')


def check_writable(folder, flag: str = '--workdir') -> None:
  """Fails now, with a sentence, when `folder` cannot be written: not after the work."""
  e = write_problem(folder)
  if e is not None:
    raise WorkdirError(
        f'Cannot write to {folder} ({type(e).__name__}: {getattr(e, "strerror", None) or e}). '
        + ('Every mode writes its checkpoints, reports or outputs in the workdir: pass a --workdir '
           'you can write to (copy a finished run there to evaluate it).' if flag == '--workdir'
           else f'Pass a {flag} you can write to.')) from e


# ------------------------------------------------------------------------------------------------
# The managers.


def managers(workdir, config: ml_collections.ConfigDict
             ) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """(latest, best) managers of a workdir (see the module docstring)."""
  return (_manager(workdir, LATEST, config.train.keep_checkpoints),
          _manager(workdir, BEST, config.train.get('keep_best', 5), best=True))


def _manager(workdir, name: str, max_to_keep: int | None,
             best: bool = False) -> ocp.CheckpointManager:
  # Each manager names its own cross-host barriers: both save the same step at an epoch's end,
  # and with one name the hosts' "step N written" barriers collide.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True,
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
  if best:
    options.best_fn = lambda metrics: metrics['validation_loss']
    options.best_mode = 'min'
  return ocp.CheckpointManager(epath.Path(workdir) / name, options=options)


def save_state(manager: ocp.CheckpointManager, state, progress: dict) -> None:
  """A resumable checkpoint: the whole TrainState and the progress JSON (which holds the spec)."""
  manager.save(int(progress['step']), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))


def save_best(manager: ocp.CheckpointManager, variables: dict, checkpoint_spec: dict,
              validation_loss: float) -> None:
  """An inference checkpoint, ranked by its validation loss (the manager keeps the K lowest)."""
  manager.save(int(checkpoint_spec['step']), metrics={'validation_loss': validation_loss},
               args=ocp.args.Composite(variables=ocp.args.StandardSave(variables),
                                       spec=ocp.args.JsonSave(checkpoint_spec)))


# ------------------------------------------------------------------------------------------------
# Restoring.


def _onto(template, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      template)


def restore_state(manager: ocp.CheckpointManager, template, signature: dict, sharding,
                  step: int | None = None):
  """(state, progress) of a resumable checkpoint (default: the latest step), model checked."""
  step = manager.latest_step() if step is None else step
  progress = manager.restore(step, args=ocp.args.Composite(
      progress=ocp.args.JsonRestore()))['progress']
  check_model(progress.get('model'), signature, f'at step {step} in {manager.directory}')
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_onto(template, sharding))))
  return restored['state'], progress


def choose(workdir, which: str | int = 'best') -> tuple[str, int]:
  """(manager name, step) of 'best' (lowest validation loss), 'latest', or a step number."""
  workdir = epath.Path(workdir)
  steps = {name: _steps(workdir / name) for name in (LATEST, BEST)}
  if not steps[LATEST] and not steps[BEST]:
    raise CheckpointNotFoundError(f'No checkpoint in {workdir}; train first (--config.mode=train).')
  if which == 'best':
    if not steps[BEST]:
      raise CheckpointNotFoundError(f'No best checkpoint in {workdir} (none finished an epoch); '
                                    f'use "latest" (steps {steps[LATEST]}).')
    manager = _manager(workdir, BEST, None, best=True)
    return BEST, int(manager.best_step())
  if which == 'latest':
    name = LATEST if steps[LATEST] else BEST
    return name, max(steps[name])
  try:
    step = int(which)
  except ValueError:
    raise ConfigError(f"checkpoint={which!r}; expected 'best', 'latest' or a step number") from None
  for name in (BEST, LATEST):
    if step in steps[name]:
      return name, step
  raise CheckpointNotFoundError(f'No checkpoint at step {step} in {workdir}: there are '
                                f'{sorted(set(steps[LATEST]) | set(steps[BEST]))}.')


def best_steps(workdir, k: int | None = None) -> list[int]:
  """The steps of the `k` (default: all kept) best checkpoints of a workdir, lowest validation
  loss first (the later MURA paper ensembles its 5 best)."""
  directory = epath.Path(workdir) / BEST
  steps = _steps(directory)
  if k is not None and not steps:
    check_has_checkpoints(workdir, 'evaluate')
    raise CheckpointNotFoundError(
        f'{workdir} has no best checkpoint yet (none is kept before the first epoch ends; '
        f'resumable steps: {_steps(epath.Path(workdir) / LATEST)}): train at least one epoch, or '
        "evaluate --config.evaluation.checkpoint=latest with --config.evaluation.ensemble=1.")
  if k is not None and len(steps) < k:
    raise CheckpointNotFoundError(
        f'{directory} holds {len(steps)} checkpoints, fewer than the {k} asked for '
        '(config.evaluation.ensemble): train more epochs with config.train.keep_best >= '
        f'{k}, or ask for fewer.')
  loss = {step: read_spec(workdir, BEST, step)['validation_loss'] for step in steps}
  return sorted(steps, key=lambda step: (loss[step], step))[:k]


def check_has_checkpoints(workdir, mode: str) -> None:
  """Evaluate, cam and export need a trained workdir: a sentence now, not a count of 0 later."""
  workdir = epath.Path(workdir)
  if not _steps(workdir / LATEST) and not _steps(workdir / BEST):
    partial = [p.name for name in (LATEST, BEST) if (workdir / name).exists()
               for p in (workdir / name).glob(_PARTIAL_SAVE)]
    raise CheckpointNotFoundError(
        f'{workdir} has no checkpoints: {mode} reads a trained model from its workdir'
        + (f' (it holds only unfinished saves: {", ".join(partial)})' if partial else '')
        + '. Train first with the same --workdir (--config.mode=train, with the config you '
        f'will {mode} with), or pass the --workdir of a trained run.')


def remove_partial_saves(workdir, note=logging.warning) -> list[str]:
  """Removes the folders of saves that never completed (a run killed while saving, a full disk),
  with a note naming them; returns their paths. Only for the one run holding the workdir's lock:
  another run's save in progress looks the same."""
  removed = []
  for name in (LATEST, BEST):
    directory = epath.Path(workdir) / name
    if not directory.exists():
      continue
    for partial in sorted(directory.glob(_PARTIAL_SAVE)):
      if partial.is_dir():
        partial.rmtree()
      else:
        partial.unlink()
      removed.append(str(partial))
  if removed:
    note('Removed %d unfinished checkpoint save(s) left by an earlier run (killed, or the disk was '
         'full, while saving): %s', len(removed), ', '.join(removed))
  return removed


def last_good_checkpoint(workdir) -> str:
  """'the last good checkpoint is step N in WORKDIR/checkpoints', or that there is none: what
  is on disk, completed (not what was last asked to be saved: orbax saves in the background)."""
  steps = _steps(epath.Path(workdir) / LATEST)
  if not steps:
    return f'no checkpoint was completed in {epath.Path(workdir) / LATEST} before it'
  return f'the last good checkpoint is step {max(steps)} in {epath.Path(workdir) / LATEST}'


def is_disk_full(error: BaseException | None) -> bool:
  """Whether `error` (or what caused it) is a full disk or quota: OSError ENOSPC/EDQUOT, or
  tensorstore's ValueError 'RESOURCE_EXHAUSTED: ... No space left on device' (not XLA's
  RESOURCE_EXHAUSTED for device memory)."""
  seen = 0
  while error is not None and seen < 10:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if re.search(r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'",
                 str(error)):
      return True
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False


def disk_full_error(workdir, error: BaseException, mode: str) -> WorkdirError | None:
  """The sentence for a run stopped by a full disk; None for any other error."""
  if not is_disk_full(error):
    return None
  resumable = mode == 'train' and _steps(epath.Path(workdir) / LATEST)
  again = 'run the same command again' + (': training resumes from it' if resumable else '')
  partial = any((epath.Path(workdir) / name).exists() and any(
      (epath.Path(workdir) / name).glob(_PARTIAL_SAVE)) for name in (LATEST, BEST))
  return WorkdirError(
      f'The disk holding {workdir} is full (No space left on device): the {mode} run stopped; '
      f'{last_good_checkpoint(workdir)}. Free space there (or copy the workdir to a larger '
      f'disk and pass that --workdir) and {again}'
      + ('; the unfinished save is removed at the start.' if partial else '.'))


def _steps(directory: epath.Path) -> list[int]:
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def read_spec(workdir, name: str, step: int) -> dict:
  """The spec of a checkpoint: a best checkpoint's own, or a resumable one's progress."""
  manager = _manager(workdir, name, None, best=name == BEST)
  item = 'spec' if name == BEST else 'progress'
  found = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
  if 'preprocessing' not in found:
    raise CheckpointMismatchError(
        f'The checkpoint at step {step} in {manager.directory} has no preprocessing in its spec '
        '(written by an older mura-jax); train again into a new --workdir.')
  if found.get('spec_version', SPEC_VERSION) > SPEC_VERSION:
    raise CheckpointMismatchError(
        f'The checkpoint at step {step} in {manager.directory} has spec version '
        f'{found["spec_version"]}, newer than this mura-jax ({SPEC_VERSION}); upgrade mura-jax.')
  return found


def restore_variables(workdir, name: str, step: int, model: densenet.DenseNet, sharding,
                      signature: dict | None = None) -> tuple[dict, dict]:
  """({'params', 'batch_stats'}, spec) of any checkpoint, replicated with `sharding`.

  From a resumable checkpoint only the network's variables are read (orbax's partial restore),
  not Adam's moments.
  """
  checkpoint_spec = read_spec(workdir, name, step)
  if signature is not None:
    check_model(checkpoint_spec['model'], signature,
                f'at step {step} in {epath.Path(workdir) / name}')
  shapes = densenet.variable_shapes(model, checkpoint_spec['model']['in_channels'])
  shapes = {'params': shapes['params'], 'batch_stats': shapes['batch_stats']}
  manager = _manager(workdir, name, None, best=name == BEST)
  if name == BEST:
    # Read into host arrays, then one transfer of the whole tree: orbax placing each of
    # densenet169's 846 arrays on the devices itself took 1.0 s, this 0.6 s (2-core CPU).
    on_host = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    variables = jax.device_put(manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(on_host)))['variables'], sharding)
  else:
    template = _onto(shapes, sharding)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), template)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=template, restore_args=restore_args, partial_restore=True)))['state']
    variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return variables, checkpoint_spec
