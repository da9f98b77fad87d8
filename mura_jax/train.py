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

import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from tfds_mura import BODY_PARTS
from tqdm import tqdm

from mura_jax import checkpoints
from mura_jax import evaluation
from mura_jax import inference
from mura_jax import input_pipeline
from mura_jax import loss as loss_lib
from mura_jax import parallel
from mura_jax import preprocessing
from mura_jax import step_cache
from mura_jax import studies
from mura_jax.models import densenet
from mura_jax.models import weights as weights_lib
from mura_jax.errors import ConfigError, UserError


class TrainingDivergedError(UserError, FloatingPointError):
  """The loss or the state became NaN or infinite; the message names the last good checkpoint."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any        # Adam's moments
  plateau_state: Any    # optax.contrib.reduce_on_plateau: the learning-rate scale
  rng: jax.Array        # dropout


# ------------------------------------------------------------------------------------------------
# 1. The model.


def create_model(config: ml_collections.ConfigDict) -> densenet.DenseNet:
  m = config.model
  return checkpoints.create_model(checkpoints.model_signature(config), dtype=m.dtype,
                                  drop_rate=m.drop_rate, remat=m.remat,
                                  scan_segment=0 if m.drop_rate else m.scan_segment,
                                  unrolled_blocks=m.unrolled_blocks)


# ------------------------------------------------------------------------------------------------
# 3. The paper's weighted loss (`loss`): weights per body part from the training split's counts.


weighted_bce = loss_lib.weighted_bce


# ------------------------------------------------------------------------------------------------
# 4. Optimiser and plateau schedule.


def scaled_for_devices(config: ml_collections.ConfigDict, num_devices: int):
  """The config with per-device batch sizes and the learning-rate scaling rule resolved."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.train.get('per_device_batch_size', 0):
    config.train.global_batch_size = config.train.per_device_batch_size * num_devices
  if config.evaluation.get('per_device_batch_size', 0):
    config.evaluation.global_batch_size = config.evaluation.per_device_batch_size * num_devices
  rule = config.optimizer.get('lr_scaling', 'none')
  if rule == 'sqrt':
    config.optimizer.learning_rate *= math.sqrt(config.train.global_batch_size /
                                                config.optimizer.reference_batch_size)
  elif rule != 'none':
    raise ConfigError(f"config.optimizer.lr_scaling={rule!r}; expected 'none' or 'sqrt'")
  return config


def create_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  return optax.adam(o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps)


def create_plateau(config) -> optax.GradientTransformationExtraArgs:
  """The learning-rate scale, updated once per epoch with the validation loss (not per step)."""
  o = config.optimizer
  return optax.contrib.reduce_on_plateau(factor=o.plateau_factor, patience=o.plateau_patience,
                                         rtol=o.plateau_rtol, cooldown=0, accumulation_size=1)


def initial_state(config, model) -> TrainState:
  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  # Under state_template's eval_shape (a resume) only the shapes matter: no traced-init file.
  if config.model.init == 'random' and not isinstance(init_rng, jax.core.Tracer):
    variables = random_variables(model, init_rng, config.model.in_channels)
  else:
    variables = weights_lib.initial_variables(config.model.init, model, init_rng,
                                              config.data.image_size, config.model.in_channels)
  # One transfer for the whole tree (jnp.asarray leaf by leaf stages each shape: about 1 s).
  params, batch_stats = jax.device_put((variables['params'], variables['batch_stats']))
  # Jitted: op by op, Adam's zero moments would compile one small program per parameter shape
  # (about a hundred, seconds at every start); jitted, one program, from the compilation cache.
  opt_state, plateau_state = jax.jit(
      lambda p: (create_optimizer(config).init(p), create_plateau(config).init(p)))(params)
  return TrainState(
      step=jnp.asarray(0, jnp.int32), params=params,
      batch_stats=batch_stats,
      opt_state=opt_state, plateau_state=plateau_state, rng=dropout_rng)


def random_variables(model, rng, in_channels: int) -> dict:
  """Flax's random initialisation (`weights.initial_variables('random', ...)`), its traced
  program kept like the train step's (step_cache.py): a restart does not trace the model's init."""
  return dict(densenet.kept_init(model, in_channels)(rng)[0])


def state_template(config, model) -> TrainState:
  """The state's shapes and dtypes, for restoring: no weights file is read (it may be gone)."""
  random_init = ml_collections.ConfigDict(config.to_dict())
  random_init.model.init = 'random'
  return jax.eval_shape(lambda: initial_state(random_init, model))


# ------------------------------------------------------------------------------------------------
# The steps: pure functions of the state and a global batch.


def train_step(state: TrainState, batch, *, model, tx, loss_weights, in_channels):
  images = preprocessing.normalize(batch['image'], in_channels)
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                  train=True, mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    return weighted_bce(logits[:, 0], batch['label'], batch['body_part'], loss_weights), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  adam_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  scale = state.plateau_state.scale
  params = optax.apply_updates(state.params, jax.tree.map(lambda u: scale * u, adam_updates))
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=updates['batch_stats'], opt_state=opt_state)
  return new_state, {'loss': loss, 'learning_rate_scale': scale}


@dataclasses.dataclass
class Steps:
  """The jitted, sharded steps of one run: `train` on a state, `eval` (inference's
  `predict_step` with the weighted loss) on the network's variables."""
  train: Any
  eval: Any
  mesh: Any


def compile_steps(config, model, loss_weights, mesh, traced_cache=None) -> Steps:
  """`traced_cache`: where the traced train step is kept (step_cache.py; default beside the
  compilation cache when that is on): a restart skips tracing it."""
  tx = create_optimizer(config)
  replicated, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  # Everything train_step closes over, for the traced step's key.
  description = (f'train_step of {model!r}\noptimizer {config.optimizer.to_dict()!r}\n'
                 f'loss weights {np.asarray(loss_weights).tolist()!r}\n'
                 f'in_channels {config.model.in_channels}')
  train = step_cache.jit(
      functools.partial(train_step, model=model, tx=tx, loss_weights=loss_weights,
                        in_channels=config.model.in_channels), description,
      in_shardings=(replicated, data), out_shardings=(replicated, replicated), donate_argnums=(0,),
      directory=traced_cache)
  evaluate = inference.compile_predict_step(model, config.model.in_channels, mesh, loss_weights)
  return Steps(train, evaluate, mesh)


def compile_while_reading(steps: Steps, state: TrainState, local_batches, config):
  """The run's first batch is read (worker processes start, images decode) in a thread while the
  train step compiles (or loads from the compilation cache): both take seconds at start-up.
  Returns the batches, the first one included."""
  shapes = input_pipeline.train_batch_shapes(config.train.global_batch_size,
                                             config.data.image_size)
  sharding = parallel.batch_sharding(steps.mesh)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
           for k, (shape, dtype) in shapes.items()}
  with concurrent.futures.ThreadPoolExecutor(1) as reader:
    first = reader.submit(next, local_batches, None)
    steps.train.lower(state, batch).compile()  # jit keeps it: the first call does not retrace
    first_batch = first.result()
  return local_batches if first_batch is None else itertools.chain([first_batch], local_batches)


def variables_of(state: TrainState) -> dict:
  """What inference needs of a state: the network's variables."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


def parameter_overview(params) -> str:
  """Parameters per stage (conv0, dense blocks, transitions, classifier) as a small table."""
  def network_order(name):  # conv0, norm0, denseblock1, transition1, ..., norm5
    number = int(''.join(c for c in name if c.isdigit()) or 0)
    return {'conv': 0, 'norm': 1 if number == 0 else 10**6}.get(name.rstrip('0123456789'),
                                                                2 * number + ('transition' in name))
  rows = []
  for name, subtree in sorted(params['features'].items(), key=lambda kv: network_order(kv[0])):
    rows.append((f'features/{name}', sum(x.size for x in jax.tree.leaves(subtree))))
  rows.append(('classifier', sum(x.size for x in jax.tree.leaves(params['classifier']))))
  width = max(len(n) for n, _ in rows)
  lines = [f'  {n:<{width}} {c:>12,}' for n, c in rows]
  lines.append(f'  {"total":<{width}} {sum(c for _, c in rows):>12,}')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------
# Metric writing.


def _import_clu_writers():
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  except ImportError:
    return None
  return metric_writers


class MetricWriter:
  """TensorBoard files through clu (needs TensorFlow: the `tf` extra) + the log + metrics.jsonl."""

  def __init__(self, workdir):
    self._workdir, self._just_logging = workdir, jax.process_index() > 0
    self._clu = None  # clu's import, started by `import_in_background` or at the first write
    self._tensorboard_checked = False
    self._writer = None
    self._jsonl = None if self._just_logging else epath.Path(workdir) / 'metrics.jsonl'
    # Lines are buffered and written at each flush (every epoch, at preemption, every 30 s): a
    # gs:// workdir gets one write per flush, not one round trip per line. Object stores cannot
    # append, so there the whole file is rewritten from what this process has seen.
    self._remote = self._jsonl is not None and '://' in os.fspath(self._jsonl)
    self._written = (self._jsonl.read_text() if self._remote and self._jsonl.exists() else '')
    self._pending: list[str] = []
    self._last_flush = time.time()

  def import_in_background(self):
    """clu imports TensorFlow (seconds of Python holding the interpreter lock): the loop starts
    it after the first step, when the steps run in XLA and leave the lock free; started at
    start-up it would slow the weights' loading and the model's set-up beside it."""
    if self._clu is None:
      self._clu = concurrent.futures.ThreadPoolExecutor(1).submit(_import_clu_writers)

  def _tensorboard(self):
    """The TensorBoard writer, made at the first write (None without TensorFlow)."""
    if not self._tensorboard_checked:
      self.import_in_background()
      metric_writers, self._tensorboard_checked = self._clu.result(), True
      if metric_writers is None:
        logging.warning('TensorFlow is not installed: no TensorBoard files; metrics go to the log '
                        'and metrics.jsonl (pip install "mura-jax[tf]" for TensorBoard).')
      else:
        self._writer = metric_writers.create_default_writer(self._workdir,
                                                            just_logging=self._just_logging)
    return self._writer

  def write(self, step: int, scalars: dict):
    scalars = {k: float(v) for k, v in scalars.items() if v is not None}
    self._tensorboard()
    if self._writer is not None:
      self._writer.write_scalars(step, scalars)
    else:
      logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in scalars.items()))
    if self._jsonl is not None:
      self._pending.append(json.dumps({'step': step, **{k: (v if math.isfinite(v) else None)
                                                        for k, v in scalars.items()}}) + '\n')
      if time.time() - self._last_flush > 30:
        self.flush()

  def flush(self):
    if self._tensorboard() is not None:
      self._writer.flush()
    if self._jsonl is not None and self._pending:
      if self._remote:
        self._written += ''.join(self._pending)
        self._jsonl.write_text(self._written)
      else:
        with self._jsonl.open('a') as f:
          f.write(''.join(self._pending))
      self._pending = []
    self._last_flush = time.time()


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


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every float in the tree (params, batch statistics, Adam's moments) is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _process_age() -> float | None:
  """Seconds since this process started (Linux), for the start-to-first-step log line."""
  try:
    with open('/proc/self/stat') as f:
      started = int(f.read().rsplit(')', 1)[1].split()[19]) / os.sysconf('SC_CLK_TCK')
    with open('/proc/uptime') as f:
      return float(f.read().split()[0]) - started
  except (OSError, ValueError, IndexError):
    return None


def validate(steps: Steps, state, source, config) -> dict[str, np.ndarray]:
  """Per-view probabilities and weighted losses of the validation split (`inference`)."""
  return inference.predict_split(
      steps.eval, variables_of(state), source, mesh=steps.mesh,
      global_batch=config.evaluation.global_batch_size,
      preprocessing=preprocessing.Preprocessing.from_config(config),
      num_workers=config.data.num_workers)


def study_metrics(split_index: input_pipeline.SplitIndex, probability, config) -> dict:
  """The epoch's study-level report (no bootstrap), at the configured threshold and aggregation."""
  table = studies.from_split(split_index, probability, config.evaluation.aggregation)
  return evaluation.evaluate(table, evaluation.options_from_config(config, num_resamples=0))


def epoch_summary(report: dict, validation_loss: float) -> dict[str, float]:
  scalars = {'validation_loss': validation_loss}
  for group, entry in report['groups'].items():
    for metric in ('auroc', 'kappa', 'f1'):
      scalars[f'{metric}/{group}'] = entry['metrics'][metric]['value']
  return scalars


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains as in the paper, resuming from the workdir if it holds checkpoints; returns a summary."""
  from mura_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  started, first_step = time.time(), True
  mesh = parallel.make_mesh()
  parallel.log_topology(mesh)
  writer = MetricWriter(workdir)
  config = scaled_for_devices(config, mesh.devices.size)
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
  valid_source, valid_index = data_lib.split_of_body_parts(
      data_dir, 'validation', body_parts, input_pipeline.read_split_index(data_dir, 'validation'))
  loss_weights = loss_lib.dataset_loss_weights(data_dir, body_parts)
  logging.info('Weighted loss [w_T,0 (normal), w_T,1 (abnormal)] per body part:\n%s',
               '\n'.join(f'  {p:<9} {w[0]:.4f} {w[1]:.4f}'
                         for p, w in zip(BODY_PARTS, loss_weights) if p in body_parts))

  model = create_model(config)
  signature = checkpoints.model_signature(config)
  if jax.process_index() == 0:  # this run holds the workdir (main.py's lock): no save is live
    checkpoints.remove_partial_saves(workdir)
  latest, best = checkpoints.managers(workdir, config)
  # A continued run must have the config it started with (or say the change is intended).
  checkpoints.record_config(workdir, config, continuing=latest.latest_step() is not None)
  steps_per_epoch = input_pipeline.num_train_batches(len(train_source), config.train.global_batch_size)
  if steps_per_epoch == 0:
    raise ConfigError(f'The training split has {len(train_source)} views, fewer than one global '
                     f'batch of {config.train.global_batch_size}.')
  total_steps = steps_per_epoch * config.train.num_epochs

  if latest.latest_step() is not None:
    template = state_template(config, model)
    state, progress = checkpoints.restore_state(latest, template, signature,
                                                parallel.replicated(mesh))
    logging.info('Resuming from step %d (epoch %d, batch %d of %d).', progress['step'],
                 progress['epoch'], progress['batch_in_epoch'], steps_per_epoch)
  else:
    state = initial_state(config, model)
    progress = checkpoints.spec(config, step=0, epoch=0, batch_in_epoch=0,
                                best_validation_loss=None, seed=config.seed,
                                body_parts=list(body_parts))
  state = jax.device_put(state, parallel.replicated(mesh))
  logging.info('Model %s (compute %s):\n%s\n%d steps per epoch of %d views (global batch %d).',
               config.model.arch, config.model.dtype, parameter_overview(state.params),
               steps_per_epoch, len(train_source), config.train.global_batch_size)
  steps = compile_steps(config, model, loss_weights, mesh)
  plateau = create_plateau(config)
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
    if not bool(all_finite((state.params, state.batch_stats, state.opt_state))):
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
        local_batches = compile_while_reading(steps, state, local_batches, config)
      tick, tick_step = time.time(), int(state.step)
      for batch_in_epoch, local in enumerate(local_batches, start=start_batch):
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
          writer.write(step, {'train_loss': loss, 'learning_rate': lr,
                              'images_per_second': images_per_second})
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

      # End of epoch: validation loss -> plateau schedule, metrics, checkpoints.
      predictions = validate(steps, state, valid_source, config)
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
      checkpoints.save_best(best, variables_of(state), checkpoints.spec(
          config, step=int(state.step), epoch=epoch + 1, validation_loss=validation_loss,
          body_parts=list(body_parts)),
          validation_loss)
  bar.close()
  latest.wait_until_finished()
  best.wait_until_finished()
  return {'status': 'done', 'step': int(state.step), 'best_step': best.best_step(),
          'best_validation_loss': progress['best_validation_loss']}


@contextlib.contextmanager
def _finishing_saves_on_a_full_disk(manager):
  """On a full disk, the save in flight ends before the error goes up: main.py's sentence then
  names the last checkpoint that is complete on disk."""
  try:
    yield
  except Exception as e:
    if checkpoints.is_disk_full(e):
      try:
        manager.wait_until_finished()
      except Exception:  # pylint: disable=broad-except  (that save failed too: the disk tells)
        pass
    raise


def _fmt(value):
  return 'n/a' if value is None else f'{value:.3f}'
