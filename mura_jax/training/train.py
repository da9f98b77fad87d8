"""Training as in the MURA paper, top to bottom.

  1. A DenseNet-169 initialised from ImageNet, its classifier replaced by one abnormality logit.
  2. Views of the training split, normalised with ImageNet statistics, scaled to 224 x 224,
     randomly flipped laterally and rotated (`input_pipeline`).
  3. A weighted binary cross-entropy per study type T: w_T,1 = N_T / (A_T + N_T) on abnormal views,
     w_T,0 = A_T / (A_T + N_T) on normal ones, from the training split's image counts.
  4. Adam (lr 1e-4, b1 0.9, b2 0.999), batch 8; after every epoch the validation loss drives a
     plateau schedule that divides the learning rate by 10 when it stops improving.
  5. The checkpoints with the lowest validation loss are kept (`checkpoints`: the K best); the
     best is evaluated at the end (`evaluation`, through `inference`).

Everything is one `TrainState` pytree and pure jitted steps sharded over all devices
(`parallel`). The latest checkpoints hold the state and the input position, so a restart after a
preemption continues exactly where it stopped. The validation at the end of every epoch is
`inference`'s, the very function evaluate mode, CAM, predict and export run.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from tfds_mura import BODY_PARTS
from tqdm import tqdm

from mura_jax import checkpoints
from mura_jax import errors
from mura_jax import workdir as workdir_lib
from mura_jax.data import dataset as data_lib
from mura_jax.data import input_pipeline
from mura_jax.errors import ConfigError, UserError
from mura_jax.evaluation import reports
from mura_jax.evaluation import scoring
from mura_jax.evaluation import studies
from mura_jax.runtime import parallel
from mura_jax.training import controls
from mura_jax.training import loss as loss_lib
from mura_jax.training import metric_writer
from mura_jax.training import state as train_state


class TrainingDivergedError(UserError, FloatingPointError):
  """The loss or the state became NaN or infinite; the message names the last good checkpoint."""


# ------------------------------------------------------------------------------------------------
# The epoch loop.


class Preemption:
  """A preemption notice (SIGTERM) asks the loop to save and stop, on every host at one step.

  One process: a SIGTERM handler sets a flag, seen at the next step. Several processes: hosts
  are told at different moments, and a save is a collective, so JAX's preemption sync point
  decides (jax.distributed's coordination service catches SIGTERM on any host, and every host
  learns the same step to stop at through `CheckpointManager.reached_preemption`, which every
  host calls at every step). Installing a Python handler there would take SIGTERM away from it.
  """

  def __init__(self, manager):
    self.manager = manager
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: no signal handling
        self._previous = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('SIGTERM: saving a checkpoint and stopping.')
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self.manager.reached_preemption(step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _process_age() -> float | None:
  """Seconds since this process started (Linux), for the start-to-first-step log line."""
  try:
    with open('/proc/self/stat') as f:
      started = int(f.read().rsplit(')', 1)[1].split()[19]) / os.sysconf('SC_CLK_TCK')
    with open('/proc/uptime') as f:
      return float(f.read().split()[0]) - started
  except (OSError, ValueError, IndexError):
    return None


def validate(steps: train_state.Steps, state, source, loss_weights,
             config) -> dict[str, np.ndarray]:
  """Per-view probabilities and weighted losses of the validation split (`inference`)."""
  return steps.validation.with_variables(train_state.variables_of(state)).predict_split(
      source, loss_weights=loss_weights, num_workers=config.data.num_workers, progress=False)


def study_metrics(split_index: input_pipeline.SplitIndex, probability, config) -> dict:
  """The epoch's study-level report (no bootstrap), at the configured threshold and aggregation."""
  table = studies.from_split(split_index, probability, config.evaluation.aggregation)
  return reports.evaluate(table, scoring.options_from_config(config, num_resamples=0))


def epoch_summary(report: dict, validation_loss: float) -> dict[str, float]:
  scalars = {'validation_loss': validation_loss}
  for group, entry in report['groups'].items():
    for metric in ('auroc', 'kappa', 'f1'):
      scalars[f'{metric}/{group}'] = entry['metrics'][metric]['value']
  return scalars


check = scoring.check_evaluation_config  # each epoch's validation scores at its threshold


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Train mode: prepares the data (synthetic if configured), trains; returns 'done' (main.py then
  runs config.after_training) or 'preempted'."""
  if config.data.synthetic:
    data_lib.prepare_dataset(config, workdir)
  status = train_and_evaluate(config, workdir)['status']
  if status == 'done' and config.train.get('shuffled_labels_control', False):
    control = controls.control_dir(workdir)  # the CAM report's control (controls.py)
    controls.write_note(control, config.seed)
    started = time.time()
    status = train_and_evaluate(controls.control_config(config, workdir), str(control),
                                relabel=controls.shuffled_labels(config.seed))['status']
    logging.info('Shuffled-labels control trained in %.0f s: %s.', time.time() - started, control)
  return status


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, relabel=None) -> dict:
  """Trains as in the paper, resuming from the workdir if it holds checkpoints; returns a summary.
  `relabel` (controls.py): (training source, data_dir, body parts) -> a source with other
  labels, for a control."""
  started, first_step = time.time(), True
  mesh = parallel.make_mesh()
  parallel.log_topology(mesh)
  writer = metric_writer.MetricWriter(workdir)
  config = train_state.scaled_for_devices(config, mesh.devices.size)
  logging.info('Global batch %d (evaluation %d) over %d devices; learning rate %.3g (%s).',
               config.train.global_batch_size, config.evaluation.global_batch_size,
               mesh.devices.size, config.optimizer.learning_rate,
               config.optimizer.get('lr_scaling', 'none'))
  parallel.check_batch_size(config.train.global_batch_size, mesh)
  parallel.check_batch_size(config.evaluation.global_batch_size, mesh)
  _, data_dir = data_lib.dataset_dirs(config, workdir)
  # config.data.body_parts: the study types trained and validated on (all that have images).
  body_parts = data_lib.training_body_parts(config, data_dir)
  config.data.body_parts = ','.join(body_parts)  # config.json and the specs record them
  train_source, _ = data_lib.split_of_body_parts(data_dir, 'train', body_parts)
  if relabel is not None:
    train_source = relabel(train_source, data_dir, body_parts)
  valid_source, valid_index = data_lib.split_of_body_parts(
      data_dir, 'validation', body_parts, input_pipeline.read_split_index(data_dir, 'validation'))
  loss_weights = loss_lib.dataset_loss_weights(data_dir, body_parts)
  # The model's scope, in every checkpoint's spec (and so in its export and model card).
  scope = {'body_parts': list(body_parts),
           'data': data_lib.data_origin(config, data_dir, body_parts)}
  logging.info('Weighted loss [w_T,0 (normal), w_T,1 (abnormal)] per body part:\n%s',
               '\n'.join(f'  {p:<9} {w[0]:.4f} {w[1]:.4f}'
                         for p, w in zip(BODY_PARTS, loss_weights) if p in body_parts))

  model = train_state.network_of(config)
  signature = checkpoints.model_signature(config)
  if jax.process_index() == 0:  # this run holds the workdir (main.py's lock): no save is live
    checkpoints.remove_partial_saves(workdir)
  latest, best = checkpoints.managers(workdir, config)
  # A continued run must have the config it started with (or say the change is intended).
  workdir_lib.record_config(workdir, config, continuing=latest.latest_step() is not None)
  steps_per_epoch = input_pipeline.num_train_batches(len(train_source), config.train.global_batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(f'The training split has {len(train_source)} views, fewer than one global '
                     f'batch of {config.train.global_batch_size}.')
  total_steps = steps_per_epoch * config.train.num_epochs

  if latest.latest_step() is not None:
    template = train_state.state_template(config, model)
    state, progress = checkpoints.restore_state(latest, template, signature,
                                                parallel.replicated(mesh))
    logging.info('Resuming from step %d (epoch %d, batch %d of %d).', progress['step'],
                 progress['epoch'], progress['batch_in_epoch'], steps_per_epoch)
  else:
    state = train_state.initial_state(config, model)
    progress = checkpoints.spec(config, step=0, epoch=0, batch_in_epoch=0,
                                best_validation_loss=None, seed=config.seed,
                                loss_weights=loss_weights.tolist(), **scope)
  state = jax.device_put(state, parallel.replicated(mesh))
  logging.info('Model %s (compute %s):\n%s\n%d steps per epoch of %d views (global batch %d).',
               config.model.arch, config.model.dtype, train_state.parameter_overview(state.params),
               steps_per_epoch, len(train_source), config.train.global_batch_size)
  warmup = train_state.warmup_steps(config, steps_per_epoch)
  if warmup:
    logging.info('Learning rate warm-up: linear over the first %d steps.', warmup)
  steps = train_state.compile_steps(config, model, loss_weights, mesh, warmup=warmup)
  plateau = train_state.create_plateau(config)
  is_main = jax.process_index() == 0
  bar = tqdm(total=total_steps, initial=progress['step'], unit='step', disable=not is_main,
             desc='train', dynamic_ncols=True)

  def last_good():
    """What is on disk, once the save in flight (orbax saves in the background) is done."""
    try:
      latest.wait_until_finished()
    except Exception:  # pylint: disable=broad-except  (a failed save: the disk tells what is kept)
      pass
    return checkpoints.last_good_checkpoint(workdir)

  def checkpoint(epoch, batch_in_epoch):
    """Saves a resumable checkpoint, never of a non-finite state (the last good one stays)."""
    step = int(state.step)
    # The plateau state is left out: its best value starts at +inf by design.
    if not bool(train_state.all_finite((state.params, state.batch_stats, state.opt_state))):
      raise TrainingDivergedError(
          f'The training state is not finite at step {step} (epoch {epoch}); nothing was saved: '
          f'{last_good()}. Lower --config.optimizer.learning_rate or check the input data.')
    progress.update(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch)
    checkpoints.save_state(latest, state, dict(progress))

  with Preemption(latest) as preemption, _finishing_saves_on_a_full_disk(latest):
    for epoch in range(progress['epoch'], config.train.num_epochs):
      start_batch = progress['batch_in_epoch'] if epoch == progress['epoch'] else 0
      batches = input_pipeline.train_batches(
          train_source, seed=config.seed, epoch=epoch, global_batch=config.train.global_batch_size,
          image_size=config.data.image_size, resize=config.data.resize, flip=config.data.flip,
          rotation_degrees=config.data.rotation_degrees, process_index=jax.process_index(),
          process_count=jax.process_count(), start_batch=start_batch,
          num_workers=config.data.num_workers)
      local_batches = input_pipeline.batches_of(batches)
      if first_step:
        local_batches = train_state.compile_while_reading(steps, state, local_batches, config)
      tick, tick_step = time.time(), int(state.step)
      meter, epoch_meter = input_pipeline.InputMeter(local_batches), None
      for batch_in_epoch, local in enumerate(meter, start=start_batch):
        state, metrics = steps.train(state, parallel.global_batch(local, mesh))
        step = int(state.step)
        bar.update(1)
        if first_step:
          writer.import_in_background()
          first_step, age = False, _process_age()
          logging.info('First training step done %.1f s after training started%s (compilation '
                       'included).', time.time() - started,
                       '' if age is None else f', {age:.1f} s after the process started')
        if step % config.train.log_every_steps == 0 or batch_in_epoch + 1 == steps_per_epoch:
          loss = float(metrics['loss'])
          if not math.isfinite(loss):
            raise TrainingDivergedError(
                f'The training loss is {loss} at step {step} (epoch {epoch}). Stopped: '
                f'{last_good()}. Lower --config.optimizer.learning_rate or check the input data.')
          lr = config.optimizer.learning_rate * float(metrics['learning_rate_scale'])
          images_per_second = ((step - tick_step) * config.train.global_batch_size /
                               max(time.time() - tick, 1e-9))
          epoch_meter = _add_input(epoch_meter, meter.take())  # this host's input (meter)
          writer.write(step, {'train_loss': loss, 'learning_rate': lr,
                              'images_per_second': images_per_second,
                              **epoch_meter['last']})
          bar.set_postfix(epoch=epoch, loss=f'{loss:.4f}', lr=f'{lr:.1e}', refresh=False)
          tick, tick_step = time.time(), step
        if preemption.reached(step):
          checkpoint(epoch, batch_in_epoch + 1)
          latest.wait_until_finished()
          writer.flush()
          bar.close()
          logging.warning('Preempted at step %d; restart with the same --workdir to resume.', step)
          return {'status': 'preempted', 'step': step}
        if config.train.checkpoint_every_steps and step % config.train.checkpoint_every_steps == 0:
          checkpoint(epoch, batch_in_epoch + 1)

      _log_input(epoch_meter, epoch)
      # End of epoch: validation loss -> plateau schedule, metrics, checkpoints.
      predictions = validate(steps, state, valid_source, loss_weights, config)
      validation_loss = float(np.mean(predictions['loss']))
      if not math.isfinite(validation_loss):
        raise TrainingDivergedError(f'The validation loss is {validation_loss} after epoch '
                                    f'{epoch}. Stopped: {last_good()}. Lower '
                                    '--config.optimizer.learning_rate or check the input data.')
      _, plateau_state = plateau.update(updates={}, state=state.plateau_state, value=validation_loss)
      state = state.replace(plateau_state=jax.device_put(plateau_state, parallel.replicated(mesh)))
      report = study_metrics(valid_index, predictions['probability'], config)
      scalars = epoch_summary(report, validation_loss)
      scalars['learning_rate'] = config.optimizer.learning_rate * float(plateau_state.scale)
      writer.write(int(state.step), scalars)
      writer.flush()
      if is_main:
        bar.write(f'epoch {epoch + 1}/{config.train.num_epochs}: validation loss '
                  f'{validation_loss:.4f}, study AUROC {_fmt(scalars["auroc/all"])}, kappa '
                  f'{_fmt(scalars["kappa/all"])}, F1 {_fmt(scalars["f1/all"])}, next lr '
                  f'{scalars["learning_rate"]:.1e}')
      best_so_far = progress['best_validation_loss']
      if best_so_far is None or validation_loss < best_so_far:
        progress['best_validation_loss'] = validation_loss
      checkpoint(epoch + 1, 0)
      checkpoints.save_best(best, train_state.variables_of(state), checkpoints.spec(
          config, step=int(state.step), epoch=epoch + 1, validation_loss=validation_loss,
          loss_weights=loss_weights.tolist(), **scope),
          validation_loss)
  bar.close()
  latest.wait_until_finished()
  best.wait_until_finished()
  return {'status': 'done', 'step': int(state.step), 'best_step': best.best_step(),
          'best_validation_loss': progress['best_validation_loss']}


def _add_input(total: dict | None, measured: dict[str, float]) -> dict:
  """The epoch's input so far (a mean over its log intervals) and the last interval's."""
  total = total or {'intervals': 0, 'input_images_per_second': 0.0, 'input_wait_fraction': 0.0}
  total['intervals'] += 1
  for key, value in measured.items():
    total[key] += (value - total[key]) / total['intervals']
  total['last'] = measured
  return total


def _log_input(total: dict | None, epoch: int) -> None:
  """Every host's input over the epoch, in its own log (the metrics hold host 0's)."""
  if total is not None:
    logging.info('Epoch %d, host %d input: %.0f images/s read, the loop waited for it %.0f%% of '
                 'the time (well above 0: input-bound, and that rate is the input pipeline\'s '
                 'own).', epoch + 1, jax.process_index(), total['input_images_per_second'],
                 100 * total['input_wait_fraction'])


@contextlib.contextmanager
def _finishing_saves_on_a_full_disk(manager):
  """On a full disk, the save in flight ends before the error goes up: main.py's sentence then
  names the last checkpoint that is complete on disk."""
  try:
    yield
  except Exception as e:
    if errors.is_disk_full(e):
      try:
        manager.wait_until_finished()
      except Exception:  # pylint: disable=broad-except  (that save failed too: the disk tells)
        pass
    raise


def _fmt(value):
  return 'n/a' if value is None else f'{value:.3f}'
