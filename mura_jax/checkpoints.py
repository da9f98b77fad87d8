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
  temperature.json  where evaluate fitted one (config.evaluation.temperature='fit'): the
                  temperature T of one checkpoint, probability = sigmoid(logit / T)

The spec (JSON) says what a checkpoint is: the model (architecture, `model_signature`), the
preprocessing it was trained with (`preprocessing.Preprocessing`: image size, resize, channels),
its step, epoch and validation loss, and its scope (`scope`): the body parts it was trained and
validated on and the data they came from (synthetic MURA or MURA, studies and images per split).
A checkpoint is restored only into the model its spec names (`CheckpointMismatchError`
otherwise), and replicated over the mesh it is restored onto: a checkpoint saved on 2 hosts x 2
devices loads on 1 device and vice versa. Workdirs may be gs:// paths (etils.epath throughout).
"""

from __future__ import annotations

import json
import math

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mura_jax.data import preprocessing as preprocessing_lib
from mura_jax.errors import ConfigError, UserError
from mura_jax.models import densenet
from mura_jax.runtime import step_cache
from tfds_mura import BODY_PARTS

SPEC_VERSION = 1
LATEST, BEST = 'checkpoints', 'best'
# orbax writes a step into STEP.orbax-checkpoint-tmp[-N] and renames it when complete; a run
# killed or stopped by a full disk while saving leaves that folder behind.
PARTIAL_SAVE = '*.orbax-checkpoint-tmp*'


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


def spec(config: ml_collections.ConfigDict, **fields) -> dict:
  """The spec of a checkpoint of this config (model, preprocessing) plus `fields` (step, ...)."""
  return {'spec_version': SPEC_VERSION, 'model': model_signature(config),
          'preprocessing': preprocessing_lib.Preprocessing.from_config(config).to_dict(), **fields}


def body_parts_of(spec: dict) -> tuple[str, ...]:
  """The body parts a checkpoint's or an export's model was trained and validated on (its scope).
  A spec that names none (an export of mura-jax before issue 28, or a checkpoint from before
  body-part subsets) is taken as all seven MURA study types, what such runs trained on."""
  return tuple(spec.get('body_parts') or BODY_PARTS)


def scope(spec: dict) -> dict:
  """What an export's spec carries of a checkpoint's scope: its body parts (`body_parts_of`) and
  the data it was trained and validated on (`data`: None where the spec predates it), with what
  was assumed for an older spec (`assumed`: a sentence, or absent)."""
  found = {'body_parts': list(body_parts_of(spec)), 'data': spec.get('data')}
  assumed = scope_assumed(spec)
  if assumed:
    found['assumed'] = assumed
  return found


def scope_assumed(spec: dict) -> str | None:
  """A sentence saying what an older spec's scope is taken to be, or None when it states it."""
  if spec.get('assumed'):
    return spec['assumed']
  if not spec.get('body_parts'):
    return ('the spec names no body parts (written by an older mura-jax): taken as all seven '
            f'MURA study types ({", ".join(BODY_PARTS)})')
  return None


def check_model(found: dict | None, expected: dict, where: str) -> None:
  """Raises CheckpointMismatchError naming the differing keys."""
  if found != expected:
    found = found or {}
    diff = {k: (found.get(k), expected.get(k)) for k in sorted(set(found) | set(expected))
            if found.get(k) != expected.get(k)}
    raise CheckpointMismatchError(
        f'The checkpoint {where} was written for another model (key: (checkpoint, config)): '
        f'{diff}. Use a new --workdir, or the config it was trained with.')


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
  steps = {name: steps_of(workdir / name) for name in (LATEST, BEST)}
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
  steps = steps_of(directory)
  if k is not None and not steps:
    check_has_checkpoints(workdir, 'evaluate')
    raise CheckpointNotFoundError(
        f'{workdir} has no best checkpoint yet (none is kept before the first epoch ends; '
        f'resumable steps: {steps_of(epath.Path(workdir) / LATEST)}): train at least one epoch, or '
        "evaluate --config.evaluation.checkpoint=latest with --config.evaluation.ensemble=1.")
  if k is not None and len(steps) < k:
    raise CheckpointNotFoundError(
        f'{directory} holds {len(steps)} checkpoints, fewer than the {k} asked for '
        '(config.evaluation.ensemble): train more epochs with config.train.keep_best >= '
        f'{k}, or ask for fewer.')
  loss = {step: read_spec(workdir, BEST, step)['validation_loss'] for step in steps}
  return sorted(steps, key=lambda step: (loss[step], step))[:k]


def remove_partial_saves(workdir, note=logging.warning) -> list[str]:
  """Removes the folders of saves that never completed (a run killed while saving, a full disk),
  with a note naming them; returns their paths. Only for the one run holding the workdir's lock:
  another run's save in progress looks the same."""
  removed = []
  for name in (LATEST, BEST):
    directory = epath.Path(workdir) / name
    if not directory.exists():
      continue
    for partial in sorted(directory.glob(PARTIAL_SAVE)):
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
  steps = steps_of(epath.Path(workdir) / LATEST)
  if not steps:
    return f'no checkpoint was completed in {epath.Path(workdir) / LATEST} before it'
  return f'the last good checkpoint is step {max(steps)} in {epath.Path(workdir) / LATEST}'


def steps_of(directory: epath.Path) -> list[int]:
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
  shapes = step_cache.variable_shapes(model, checkpoint_spec['model']['in_channels'])
  shapes = {'params': shapes['params'], 'batch_stats': shapes['batch_stats']}
  manager = _manager(workdir, name, None, best=name == BEST)
  if name == BEST:
    # Read into host arrays, then one transfer of the whole tree: faster than orbax placing each
    # of densenet169's 846 arrays on the devices itself (docs/benchmarks-history.md,
    # "Measurements behind choices in the code").
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


def check_has_checkpoints(workdir, mode: str) -> None:
  """Evaluate, cam and export need a trained workdir: a sentence now, not a count of 0 later."""
  workdir = epath.Path(workdir)
  if not steps_of(workdir / LATEST) and not steps_of(workdir / BEST):
    partial = [p.name for name in (LATEST, BEST) if (workdir / name).exists()
               for p in (workdir / name).glob(PARTIAL_SAVE)]
    raise CheckpointNotFoundError(
        f'{workdir} has no checkpoints: {mode} reads a trained model from its workdir'
        + (f' (it holds only unfinished saves: {", ".join(partial)})' if partial else '')
        + '. Train first with the same --workdir (--config.mode=train, with the config you '
        f'will {mode} with), or pass the --workdir of a trained run.')


# ------------------------------------------------------------------------------------------------
# A temperature fitted after training (evaluate mode, config.evaluation.temperature='fit';
# evaluation/calibration.py): WORKDIR/temperature.json, for one checkpoint. Its one home: the
# Predictor restoring that checkpoint scales its probabilities with it, and so evaluate, CAM,
# mura-predict and export do.

TEMPERATURE_FILE = 'temperature.json'


def write_temperature(workdir, record: dict) -> None:
  """Stores {'temperature': T, 'checkpoint': {'name', 'step'}, ...} (how it was fitted)."""
  (epath.Path(workdir) / TEMPERATURE_FILE).write_text(json.dumps(record, indent=2) + '\n')


def remove_temperature(workdir) -> dict | None:
  """Removes the workdir's temperature (evaluate with temperature 'none'); returns what it was."""
  path = epath.Path(workdir) / TEMPERATURE_FILE
  if not path.exists():
    return None
  record = _read_temperature(path)
  path.unlink()
  return record


def read_temperature(workdir, name: str, step: int) -> dict | None:
  """The workdir's temperature record if it was fitted for this checkpoint (name, step), else
  None. A damaged file is a UserError naming it."""
  path = epath.Path(workdir) / TEMPERATURE_FILE
  if not path.exists():
    return None
  record = _read_temperature(path)
  fitted = record['checkpoint']
  return record if (fitted.get('name'), fitted.get('step')) == (name, int(step)) else None


def _read_temperature(path: epath.Path) -> dict:
  try:
    record = json.loads(path.read_bytes())
    temperature = float(record['temperature'])
    if not isinstance(record['checkpoint'], dict):
      raise TypeError('checkpoint is not an object')
  except (ValueError, KeyError, TypeError) as e:
    temperature = None
    problem = f'{type(e).__name__}: {e}'
  else:
    problem = None if math.isfinite(temperature) and temperature > 0 else (
        f'temperature {temperature} is not a positive number')
  if problem:
    raise UserError(f'{path} is damaged ({problem}); evaluate again with '
                    '--config.evaluation.temperature=fit to rewrite it, or delete it (the '
                    'probabilities are then not temperature-scaled).')
  return record
