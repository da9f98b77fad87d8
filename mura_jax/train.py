"""Training as in the MURA paper, top to bottom.

  1. A DenseNet-169 initialised from ImageNet, its classifier replaced by one abnormality logit.
  2. Views of the training split, normalised with ImageNet statistics, scaled to 224 x 224,
     randomly flipped laterally and rotated (`input_pipeline`).
  3. A weighted binary cross-entropy per study type T: w_T,1 = N_T / (A_T + N_T) on abnormal views,
     w_T,0 = A_T / (A_T + N_T) on normal ones, from the training split's image counts.
  4. Adam (lr 1e-4, b1 0.9, b2 0.999), batch 8; after every epoch the validation loss drives a
     plateau schedule that divides the learning rate by 10 when it stops improving.
  5. The checkpoint with the lowest validation loss is kept and evaluated at the end.

Everything is one `TrainState` pytree and pure jitted steps sharded over all devices
(`parallel`). Checkpoints (orbax) hold the state and the input position, so a restart after a
preemption continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from tqdm import tqdm

from mura_jax import input_pipeline
from mura_jax import parallel
from mura_jax.metrics import BODY_PARTS  # the ClassLabel order of tfds_mura's body_part
from mura_jax.models import densenet
from mura_jax.models import weights as weights_lib


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
  kwargs = dict(num_classes=1, drop_rate=m.drop_rate, remat=m.remat, dtype=jnp.dtype(m.dtype))
  if m.arch == 'custom':  # small DenseNets for the demo and the tests
    kwargs.update(growth_rate=m.growth_rate, block_config=tuple(m.block_config),
                  num_init_features=m.num_init_features, bn_size=m.bn_size)
    return densenet.DenseNet(**kwargs)
  return densenet.create_model(m.arch, **kwargs)


# ------------------------------------------------------------------------------------------------
# 3. The paper's weighted loss.


def loss_weights(image_counts: dict[str, dict[str, int]]) -> np.ndarray:
  """(7, 2) weights [w_T,0, w_T,1] per body part T from its normal (N) and abnormal (A) images."""
  w = np.zeros((len(BODY_PARTS), 2), np.float32)
  for t, part in enumerate(BODY_PARTS):
    normal, abnormal = image_counts[part]['normal'], image_counts[part]['abnormal']
    if normal + abnormal == 0:
      raise ValueError(f'The training split has no {part} images: the weighted loss is undefined.')
    w[t] = abnormal / (normal + abnormal), normal / (normal + abnormal)
  return w


def dataset_loss_weights(data_dir: str) -> np.ndarray:
  """`loss_weights` of the built dataset's training split, from its metadata (no image decoded)."""
  import tfds_mura  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  info = tfds.builder('mura', data_dir=data_dir).info
  return loss_weights(tfds_mura.image_counts(info, 'train'))


def weighted_bce_per_view(logits, labels, body_part, weights):
  """-w_T,1 y log p - w_T,0 (1 - y) log(1 - p) of each view, p = sigmoid(logit)."""
  w = jnp.asarray(weights)[body_part, labels.astype(jnp.int32)]
  labels = labels.astype(jnp.float32)
  return -w * (labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits))


def weighted_bce(logits, labels, body_part, weights, mask=None):
  """The paper's loss: the mean of `weighted_bce_per_view` over the (unmasked) views."""
  per_view = weighted_bce_per_view(logits, labels, body_part, weights)
  if mask is None:
    return jnp.mean(per_view)
  return jnp.sum(per_view * mask) / jnp.maximum(jnp.sum(mask), 1)


# ------------------------------------------------------------------------------------------------
# 4. Optimiser and plateau schedule.


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
  variables = weights_lib.initial_variables(config.model.init, model, init_rng,
                                            config.data.image_size, config.model.in_channels)
  params = jax.tree.map(jnp.asarray, variables['params'])
  return TrainState(
      step=jnp.asarray(0, jnp.int32), params=params,
      batch_stats=jax.tree.map(jnp.asarray, variables['batch_stats']),
      opt_state=create_optimizer(config).init(params),
      plateau_state=create_plateau(config).init(params), rng=dropout_rng)


def state_template(config, model) -> TrainState:
  """The state's shapes and dtypes, for restoring: no weights file is read (it may be gone)."""
  random_init = ml_collections.ConfigDict(config.to_dict())
  random_init.model.init = 'random'
  return jax.eval_shape(lambda: initial_state(random_init, model))


# ------------------------------------------------------------------------------------------------
# The steps: pure functions of the state and a global batch.


def train_step(state: TrainState, batch, *, model, tx, weights, in_channels):
  images = input_pipeline.normalize(batch['image'], in_channels)
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                  train=True, mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    return weighted_bce(logits[:, 0], batch['label'], batch['body_part'], weights), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  adam_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  scale = state.plateau_state.scale
  params = optax.apply_updates(state.params, jax.tree.map(lambda u: scale * u, adam_updates))
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=updates['batch_stats'], opt_state=opt_state)
  return new_state, {'loss': loss, 'learning_rate_scale': scale}


def eval_step(state: TrainState, batch, *, model, weights, in_channels):
  """Per-view probabilities and weighted losses (masked views give 0)."""
  images = input_pipeline.normalize(batch['image'], in_channels)
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, images,
                       train=False)[:, 0]
  per_view = weighted_bce_per_view(logits, batch['label'], batch['body_part'], weights)
  return {'probability': jax.nn.sigmoid(logits), 'loss': per_view * batch['mask'],
          'index': batch['index'], 'mask': batch['mask']}


@dataclasses.dataclass
class Steps:
  """The jitted, sharded steps of one run."""
  train: Any
  eval: Any
  mesh: Any


def compile_steps(config, model, weights, mesh) -> Steps:
  tx = create_optimizer(config)
  replicated, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  train = jax.jit(
      functools.partial(train_step, model=model, tx=tx, weights=weights,
                        in_channels=config.model.in_channels),
      in_shardings=(replicated, data), out_shardings=(replicated, replicated), donate_argnums=0)
  evaluate = jax.jit(
      functools.partial(eval_step, model=model, weights=weights,
                        in_channels=config.model.in_channels),
      in_shardings=(replicated, data), out_shardings=replicated)
  return Steps(train, evaluate, mesh)


# ------------------------------------------------------------------------------------------------
# Checkpoints: latest N for resume, best by validation loss for evaluation.


def model_signature(config) -> dict:
  """What a checkpoint must match to be restored into this config's model."""
  m = config.model
  signature = {'arch': m.arch, 'in_channels': m.in_channels, 'num_classes': 1}
  if m.arch == 'custom':
    signature.update(growth_rate=m.growth_rate, block_config=list(m.block_config),
                     num_init_features=m.num_init_features, bn_size=m.bn_size)
  return signature


def checkpoint_managers(workdir, config) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  workdir = epath.Path(workdir)
  # Each manager names its own cross-host barriers: both save the same step at an epoch's end,
  # and with one name the hosts' "step N written" barriers collide.
  def barriers(name):
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
  latest = ocp.CheckpointManager(
      workdir / 'checkpoints', options=ocp.CheckpointManagerOptions(
          max_to_keep=config.train.keep_checkpoints, create=True,
          multiprocessing_options=barriers('latest')))
  best = ocp.CheckpointManager(
      workdir / 'best', options=ocp.CheckpointManagerOptions(
          max_to_keep=1, best_fn=lambda m: m['validation_loss'], best_mode='min', create=True,
          multiprocessing_options=barriers('best')))
  return latest, best


def save(manager, state, progress, metrics=None):
  manager.save(int(progress['step']), metrics=metrics, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))


class CheckpointMismatchError(ValueError):
  """A checkpoint in the workdir was written for another model."""


def restore(manager, template, signature, step=None):
  """(state, progress) of a checkpoint step (default: latest), after checking the model matches."""
  step = manager.latest_step() if step is None else step
  progress = manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))['progress']
  if progress.get('model') != signature:
    theirs, ours = progress.get('model', {}), signature
    diff = {k: (theirs.get(k), ours.get(k)) for k in set(theirs) | set(ours)
            if theirs.get(k) != ours.get(k)}
    raise CheckpointMismatchError(
        f'The checkpoint at step {step} in {manager.directory} was written for another model '
        f'(key: (checkpoint, config)): {diff}. Use a new --workdir, or the config it was trained with.')
  # Restored replicated over this process's mesh: a checkpoint saved on 2 hosts x 2 devices
  # loads on 1 device (evaluation elsewhere, resuming on other hardware) and vice versa.
  sharding = parallel.replicated(parallel.make_mesh())
  template = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template)))
  return restored['state'], progress


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


class MetricWriter:
  """TensorBoard files through clu (needs TensorFlow: the `tf` extra) + the log + metrics.jsonl."""

  def __init__(self, workdir):
    just_logging = jax.process_index() > 0
    try:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
      self._writer = metric_writers.create_default_writer(workdir, just_logging=just_logging)
    except ImportError:
      logging.warning('TensorFlow is not installed: no TensorBoard files; metrics go to the log '
                      'and metrics.jsonl (pip install "mura-jax[tf]" for TensorBoard).')
      self._writer = None
    self._jsonl = None if just_logging else epath.Path(workdir) / 'metrics.jsonl'

  def write(self, step: int, scalars: dict):
    scalars = {k: float(v) for k, v in scalars.items() if v is not None}
    if self._writer is not None:
      self._writer.write_scalars(step, scalars)
    else:
      logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in scalars.items()))
    if self._jsonl is not None:
      with self._jsonl.open('a') as f:
        f.write(json.dumps({'step': step, **{k: (v if math.isfinite(v) else None)
                                             for k, v in scalars.items()}}) + '\n')

  def flush(self):
    if self._writer is not None:
      self._writer.flush()


# ------------------------------------------------------------------------------------------------
# The epoch loop.


class _Preemption:
  """SIGTERM (a preemption notice) asks the loop to save and stop at the next step."""

  def __init__(self):
    self.requested = False

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no signal handling
      self._previous = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('SIGTERM: saving a checkpoint and stopping.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def predict_split(steps: Steps, state, source, config) -> dict[str, np.ndarray]:
  """Per-view probabilities and weighted losses of a whole split, each view exactly once."""
  n = len(source)
  probability, loss = np.zeros(n, np.float64), np.zeros(n, np.float64)
  seen = np.zeros(n, np.int64)
  batches = input_pipeline.eval_batches(
      source, global_batch=config.evaluation.global_batch_size, image_size=config.data.image_size,
      resize=config.data.resize, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=config.data.num_workers)
  for local in input_pipeline.batches_of(batches):
    out = jax.device_get(steps.eval(state, parallel.global_batch(local, steps.mesh)))
    valid = out['mask'] > 0
    index = out['index'][valid]
    probability[index] = out['probability'][valid]
    loss[index] = out['loss'][valid]
    np.add.at(seen, index, 1)
  if not np.all(seen == 1):
    raise AssertionError(f'evaluation saw views {np.flatnonzero(seen != 1)[:10]} not exactly once')
  return {'probability': probability, 'loss': loss}


def study_metrics(split_index: input_pipeline.SplitIndex, probability, num_resamples=0, **kw):
  """The study-level report of `evaluation` for these per-view probabilities."""
  from mura_jax import evaluation  # pylint: disable=g-import-not-at-top
  study_paths = [f'MURA-v1.1/{split_index.studies[i]}/' for i in split_index.study_index]
  return evaluation.evaluate_views(
      probability, study_paths, split_index.label,
      [BODY_PARTS[b] for b in split_index.body_part], num_resamples=num_resamples, **kw)


def epoch_summary(report: dict, validation_loss: float) -> dict[str, float]:
  scalars = {'validation_loss': validation_loss}
  for group, entry in report['groups'].items():
    for metric in ('auroc', 'kappa', 'f1'):
      scalars[f'{metric}/{group}'] = entry['metrics'][metric]['value']
  return scalars


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains as in the paper, resuming from the workdir if it holds checkpoints; returns a summary."""
  from mura_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh()
  parallel.log_topology(mesh)
  parallel.check_batch_size(config.train.global_batch_size, mesh)
  parallel.check_batch_size(config.evaluation.global_batch_size, mesh)
  _, data_dir = data_lib.dataset_dirs(config, workdir)
  train_source = input_pipeline.data_source(data_dir, 'train')
  valid_source = input_pipeline.data_source(data_dir, 'validation')
  valid_index = input_pipeline.read_split_index(data_dir, 'validation')
  weights = dataset_loss_weights(data_dir)
  logging.info('Weighted loss [w_T,0 (normal), w_T,1 (abnormal)] per body part:\n%s',
               '\n'.join(f'  {p:<9} {w[0]:.4f} {w[1]:.4f}' for p, w in zip(BODY_PARTS, weights)))

  model = create_model(config)
  signature = model_signature(config)
  latest, best = checkpoint_managers(workdir, config)
  steps_per_epoch = input_pipeline.num_train_batches(len(train_source), config.train.global_batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f'The training split has {len(train_source)} views, fewer than one global '
                     f'batch of {config.train.global_batch_size}.')
  total_steps = steps_per_epoch * config.train.num_epochs

  if latest.latest_step() is not None:
    template = state_template(config, model)
    state, progress = restore(latest, template, signature)
    logging.info('Resuming from step %d (epoch %d, batch %d of %d).', progress['step'],
                 progress['epoch'], progress['batch_in_epoch'], steps_per_epoch)
  else:
    state = initial_state(config, model)
    progress = {'step': 0, 'epoch': 0, 'batch_in_epoch': 0, 'best_validation_loss': None,
                'model': signature, 'seed': config.seed}
  state = jax.device_put(state, parallel.replicated(mesh))
  logging.info('Model %s (compute %s):\n%s\n%d steps per epoch of %d views (global batch %d).',
               config.model.arch, config.model.dtype, parameter_overview(state.params),
               steps_per_epoch, len(train_source), config.train.global_batch_size)
  steps = compile_steps(config, model, weights, mesh)
  plateau = create_plateau(config)
  writer = MetricWriter(workdir)
  is_main = jax.process_index() == 0
  bar = tqdm(total=total_steps, initial=progress['step'], unit='step', disable=not is_main,
             desc='train', dynamic_ncols=True)
  last_saved_step = progress['step']

  def checkpoint(epoch, batch_in_epoch, manager=latest, metrics=None):
    nonlocal last_saved_step
    progress.update(step=int(state.step), epoch=epoch, batch_in_epoch=batch_in_epoch)
    save(manager, state, dict(progress), metrics)
    last_saved_step = int(state.step)

  with _Preemption() as preemption:
    for epoch in range(progress['epoch'], config.train.num_epochs):
      start_batch = progress['batch_in_epoch'] if epoch == progress['epoch'] else 0
      batches = input_pipeline.train_batches(
          train_source, seed=config.seed, epoch=epoch, global_batch=config.train.global_batch_size,
          image_size=config.data.image_size, resize=config.data.resize, flip=config.data.flip,
          rotation_degrees=config.data.rotation_degrees, process_index=jax.process_index(),
          process_count=jax.process_count(), start_batch=start_batch,
          num_workers=config.data.num_workers)
      tick, tick_step = time.time(), int(state.step)
      for batch_in_epoch, local in enumerate(input_pipeline.batches_of(batches), start=start_batch):
        state, metrics = steps.train(state, parallel.global_batch(local, mesh))
        step = int(state.step)
        bar.update(1)
        if step % config.train.log_every_steps == 0 or batch_in_epoch + 1 == steps_per_epoch:
          loss = float(metrics['loss'])
          if not math.isfinite(loss):
            raise FloatingPointError(
                f'The training loss is {loss} at step {step} (epoch {epoch}). Stopped; the last good '
                f'checkpoint (step {last_saved_step}) is kept in {workdir}/checkpoints. Lower '
                '--config.optimizer.learning_rate or check the input data.')
          lr = config.optimizer.learning_rate * float(metrics['learning_rate_scale'])
          images_per_second = ((step - tick_step) * config.train.global_batch_size /
                               max(time.time() - tick, 1e-9))
          writer.write(step, {'train_loss': loss, 'learning_rate': lr,
                              'images_per_second': images_per_second})
          bar.set_postfix(epoch=epoch, loss=f'{loss:.4f}', lr=f'{lr:.1e}', refresh=False)
          tick, tick_step = time.time(), step
        if preemption.requested:
          checkpoint(epoch, batch_in_epoch + 1)
          latest.wait_until_finished()
          bar.close()
          logging.warning('Preempted at step %d; restart with the same --workdir to resume.', step)
          return {'status': 'preempted', 'step': step}
        if config.train.checkpoint_every_steps and step % config.train.checkpoint_every_steps == 0:
          checkpoint(epoch, batch_in_epoch + 1)

      # End of epoch: validation loss -> plateau schedule, metrics, checkpoints.
      predictions = predict_split(steps, state, valid_source, config)
      validation_loss = float(np.mean(predictions['loss']))
      if not math.isfinite(validation_loss):
        raise FloatingPointError(f'The validation loss is {validation_loss} after epoch {epoch}; '
                                 f'the last good checkpoint (step {last_saved_step}) is kept.')
      _, plateau_state = plateau.update(updates={}, state=state.plateau_state, value=validation_loss)
      state = state.replace(plateau_state=jax.device_put(plateau_state, parallel.replicated(mesh)))
      report = study_metrics(valid_index, predictions['probability'], print_table=False)
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
      checkpoint(epoch + 1, 0, manager=best, metrics={'validation_loss': validation_loss})
  bar.close()
  latest.wait_until_finished()
  best.wait_until_finished()
  return {'status': 'done', 'step': int(state.step), 'best_step': best.best_step(),
          'best_validation_loss': progress['best_validation_loss']}


def _fmt(value):
  return 'n/a' if value is None else f'{value:.3f}'


# ------------------------------------------------------------------------------------------------
# 5. The kept checkpoint, evaluated: per-view probabilities -> studies -> metrics with CIs.


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str = 'validation',
                        checkpoint: str = 'best') -> dict:
  """Writes WORKDIR/eval/<split>/ (report.json, report.md, predictions.csv, ...) for a checkpoint.

  `checkpoint`: 'best' (lowest validation loss), 'latest', or a step number.
  """
  from mura_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.evaluation.global_batch_size, mesh)
  _, data_dir = data_lib.dataset_dirs(config, workdir)
  source = input_pipeline.data_source(data_dir, split)
  split_index = input_pipeline.read_split_index(data_dir, split)
  model = create_model(config)
  latest, best = checkpoint_managers(workdir, config)
  if checkpoint == 'best':
    manager, step = best, best.best_step()
  elif checkpoint == 'latest':
    manager, step = latest, latest.latest_step()
  else:
    manager, step = latest, int(checkpoint)
    if step not in latest.all_steps():
      manager = best
      if step not in best.all_steps():
        raise FileNotFoundError(f'No checkpoint at step {step} in {workdir}: there are '
                                f'{sorted(set(latest.all_steps()) | set(best.all_steps()))}.')
  if step is None:
    raise FileNotFoundError(f'No {checkpoint} checkpoint in {workdir}; train first '
                            '(--config.mode=train).')
  template = state_template(config, model)
  state, _ = restore(manager, template, model_signature(config), step)
  state = jax.device_put(state, parallel.replicated(mesh))
  steps = compile_steps(config, model, dataset_loss_weights(data_dir), mesh)
  predictions = predict_split(steps, state, source, config)
  out_dir = epath.Path(workdir) / 'eval' / split if jax.process_index() == 0 else None
  logging.info('Evaluating %s checkpoint (step %d) on %s: %d views, %d studies.', checkpoint,
               step, split, len(split_index), len(split_index.studies))
  from mura_jax import evaluation  # pylint: disable=g-import-not-at-top
  readers = (evaluation.read_readers(config.evaluation.readers)
             if config.evaluation.get('readers') else None)
  report = study_metrics(split_index, predictions['probability'], readers=readers,
                         num_resamples=config.evaluation.bootstrap_resamples,
                         seed=config.evaluation.seed, aggregation=config.evaluation.aggregation,
                         threshold=config.evaluation.threshold, out_dir=out_dir, split=split,
                         print_table=jax.process_index() == 0)
  # Which weights were scored, in the report file too.
  report['checkpoint'] = {'which': str(checkpoint), 'step': int(step),
                          'directory': str(manager.directory),
                          'weighted_loss': float(np.mean(predictions['loss']))}
  if out_dir is not None:
    (out_dir / 'report.json').write_text(json.dumps(report, indent=2, allow_nan=False) + '\n')
  return report
