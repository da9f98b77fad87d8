"""Training as in the paper: the loss, the schedule, sharding, exact resume, and its errors."""

import errno
import itertools
import math
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mura_jax import checkpoints
from mura_jax import cli
from mura_jax.configs import base
from mura_jax.data import input_pipeline
from mura_jax.errors import ConfigError, UserError, WorkdirError
from mura_jax.evaluation import evaluate
from mura_jax.evaluation import studies
from mura_jax.runtime import parallel
from mura_jax.training import loss
from mura_jax.training import state as train_state
from mura_jax.training import train


def tiny_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  config = base.base_config()
  config.data.data_dir = str(data_dir)
  config.data.image_size = 32
  config.data.rotation_degrees = 20.0
  config.model.arch = 'custom'
  config.model.growth_rate = 4
  config.model.block_config = (1, 1)
  config.model.unrolled_blocks = 1  # the second block scanned, as densenet169's last two are
  config.model.num_init_features = 8
  config.model.bn_size = 2
  config.optimizer.learning_rate = 1e-3
  config.train.global_batch_size = 8
  config.train.num_epochs = 2
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 5
  config.evaluation.global_batch_size = 16
  config.evaluation.bootstrap_resamples = 50
  for key, value in overrides.items():  # 'seed' or 'section.name'
    *sections, name = key.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  return config


# ------------------------------------------------------------------------------------------------
# The paper's weighted loss.


def test_loss_weights_are_the_papers():
  counts = {p: {'normal': 10 + i, 'abnormal': 5 + 2 * i} for i, p in enumerate(train.BODY_PARTS)}
  w = loss.loss_weights_from_counts(counts)
  for t, part in enumerate(train.BODY_PARTS):
    n, a = counts[part]['normal'], counts[part]['abnormal']
    assert w[t, 1] == pytest.approx(n / (a + n)) and w[t, 0] == pytest.approx(a / (a + n))
  counts['hand'] = {'normal': 0, 'abnormal': 0}
  with pytest.raises(ValueError, match='no hand images'):
    loss.loss_weights_from_counts(counts)


def test_dense_blocks_are_scanned_unless_there_is_dropout():
  config = base.base_config()
  assert train_state.network_of(config).scan_segment == config.model.scan_segment > 0
  assert train_state.network_of(config).unrolled_blocks == config.model.unrolled_blocks == 2
  config.model.drop_rate = 0.2  # the scanned block has no dropout: the unrolled one runs
  model = train_state.network_of(config)
  assert (model.scan_segment, model.drop_rate) == (0, 0.2)


def test_weighted_loss_on_a_hand_checked_batch():
  # Wrist: N = 6 normal, A = 4 abnormal images -> w_1 = 6/10 on abnormal, w_0 = 4/10 on normal.
  # Elbow: N = 1, A = 3 -> w_1 = 1/4, w_0 = 3/4.
  counts = {p: {'normal': 1, 'abnormal': 1} for p in train.BODY_PARTS}
  counts['wrist'] = {'normal': 6, 'abnormal': 4}
  counts['elbow'] = {'normal': 1, 'abnormal': 3}
  loss_weights = loss.loss_weights_from_counts(counts)
  wrist, elbow = train.BODY_PARTS.index('wrist'), train.BODY_PARTS.index('elbow')
  logits = jnp.array([0.0, 2.0, -1.0])
  labels = jnp.array([1, 0, 1])
  parts = jnp.array([wrist, wrist, elbow])
  sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
  by_hand = (0.6 * -math.log(sigmoid(0.0))          # abnormal wrist view, p = 0.5
             + 0.4 * -math.log(1 - sigmoid(2.0))    # normal wrist view
             + 0.25 * -math.log(sigmoid(-1.0))) / 3  # abnormal elbow view
  assert float(loss.weighted_bce(logits, labels, parts, loss_weights)) == pytest.approx(by_hand,
                                                                            rel=1e-6)
  # A mask leaves padded views out of the mean.
  masked = loss.weighted_bce(logits, labels, parts, loss_weights, mask=jnp.array([1.0, 1.0, 0.0]))
  assert float(masked) == pytest.approx((0.6 * math.log(2) + 0.4 * -math.log(1 - sigmoid(2.0))) / 2,
                                        rel=1e-6)


def test_epoch_metrics_use_the_configured_threshold_and_aggregation(mura_data_dir):
  config = tiny_config(mura_data_dir, **{'evaluation.threshold': 0.7,
                                         'evaluation.aggregation': 'max'})
  index = input_pipeline.read_split_index(str(mura_data_dir), 'validation')
  probability = np.random.default_rng(0).random(len(index))
  report = train.study_metrics(index, probability, config)
  assert report['threshold'] == 0.7 and report['aggregation'] == 'max'
  table = studies.from_split(index, probability, 'max')
  abnormal = (table.probability > 0.7) & (table.label == 1)
  assert report['groups']['all']['confusion']['tp'] == int(abnormal.sum())
  assert report['bootstrap']['num_resamples'] == 0  # no CIs at every epoch


# ------------------------------------------------------------------------------------------------
# The plateau schedule: lr / 10 once the validation loss stops improving, and not before.


def test_plateau_divides_the_learning_rate_by_ten_only_after_a_plateau():
  config = base.base_config()
  plateau = train_state.create_plateau(config)
  state = plateau.init({'w': jnp.zeros(3)})
  scales = []
  for validation_loss in (1.0, 0.8, 0.7, 0.65, 0.66, 0.60, 0.61, 0.62):
    _, state = plateau.update(updates={}, state=state, value=validation_loss)
    scales.append(float(state.scale))
  # Improving for 4 epochs: full lr. 0.66 > 0.65: one epoch without improvement -> / 10.
  # 0.60 improves: stays. 0.61 does not -> / 10 again; 0.62 neither -> / 10 again (patience 1).
  np.testing.assert_allclose(scales, [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.001], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Input positions: every view exactly once in evaluation; host shards make up the global batch.


class FakeSource:
  """A random-access source of `n` tiny views whose pixels encode their index."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.full((10 + i % 3, 12, 1), i % 256, np.uint8)
    return {'image': image, 'label': i % 2, 'body_part': i % 7}


@pytest.mark.parametrize('n,batch,processes', [(13, 4, 1), (13, 4, 2), (5, 8, 2), (16, 8, 4)])
def test_eval_pipeline_yields_every_view_exactly_once(n, batch, processes):
  seen = []
  for p in range(processes):
    batches = list(input_pipeline.batches_of(input_pipeline.eval_batches(
        FakeSource(n), global_batch=batch, image_size=8, process_index=p, process_count=processes)))
    assert all(b['image'].shape == (batch // processes, 8, 8, 1) for b in batches)
    for b in batches:
      seen += list(b['index'][b['mask'] > 0])
      # The pixels are the view's own (padding repeats view 0 with mask 0).
      np.testing.assert_array_equal(b['image'][:, 0, 0, 0], b['index'] % 256)
  assert sorted(seen) == list(range(n))


def test_host_shards_make_up_the_single_host_batches():
  source = FakeSource(37)
  kwargs = dict(seed=3, epoch=1, global_batch=8, image_size=8, rotation_degrees=10.0)
  single = list(input_pipeline.batches_of(input_pipeline.train_batches(source, **kwargs)))
  hosts = [list(input_pipeline.batches_of(input_pipeline.train_batches(
      source, process_index=p, process_count=2, **kwargs))) for p in range(2)]
  assert len(single) == 37 // 8
  for k, batch in enumerate(single):
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([hosts[0][k][key], hosts[1][k][key]]))
  # Resuming at batch 2 gives the same batches from there on.
  resumed = list(input_pipeline.batches_of(input_pipeline.train_batches(source, start_batch=2, **kwargs)))
  for a, b in zip(resumed, single[2:]):
    np.testing.assert_array_equal(a['image'], b['image'])
  # Another epoch, another order.
  other = list(input_pipeline.batches_of(input_pipeline.train_batches(source, **{**kwargs, 'epoch': 2})))
  assert not np.array_equal(other[0]['label'], single[0]['label']) or not np.array_equal(
      other[0]['image'], single[0]['image'])


def test_train_batch_shapes_are_what_train_batches_yields():
  """The train step is compiled from `train_batch_shapes` before the first batch is read: a
  mismatch would compile a program that the real batches do not use."""
  source = FakeSource(20)
  batch = next(input_pipeline.batches_of(input_pipeline.train_batches(
      source, seed=0, epoch=0, global_batch=8, image_size=12)))
  shapes = input_pipeline.train_batch_shapes(8, 12)
  assert set(shapes) == set(batch)
  for key, (shape, dtype) in shapes.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key


def test_preprocess_view_modes():
  image = np.zeros((40, 20, 1), np.uint8)
  image[:, :] = 200
  squashed = input_pipeline.preprocess_view(image, 16, 'squash')
  padded = input_pipeline.preprocess_view(image, 16, 'pad')
  assert squashed.shape == padded.shape == (16, 16, 1)
  assert squashed.min() == 200  # the whole square is the image
  assert padded[:, 0].max() == 0 and padded[8, 8, 0] == 200  # black bars left and right
  with pytest.raises(ValueError, match='resize'):
    input_pipeline.preprocess_view(image, 16, 'crop')


def test_grain_workers_are_at_most_one_per_core(monkeypatch):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
  logged = []
  monkeypatch.setattr(input_pipeline.logging, 'info', lambda msg, *a: logged.append(msg % a))
  input_pipeline.worker_count.cache_clear()
  try:
    assert input_pipeline.worker_count(8) == 2
    assert logged == ['config.data.num_workers=8 but this host lets this process use 2 CPU cores: '
                      '2 grain worker processes.']
    assert input_pipeline.worker_count(1) == 1 and len(logged) == 1
  finally:
    input_pipeline.worker_count.cache_clear()


def test_input_meter_measures_reading_and_waiting(monkeypatch):
  """On a clock of its own: each batch of 8 takes 0.1 s to come, each step 0.3 s."""
  clock = [0.0]
  monkeypatch.setattr(input_pipeline.time, 'perf_counter', lambda: clock[0])

  def batches():
    for _ in range(5):
      clock[0] += 0.1  # the loop waits for the batch
      yield {'label': np.zeros(8, np.int32)}

  meter = input_pipeline.InputMeter(batches())
  for _ in itertools.islice(meter, 4):
    clock[0] += 0.3  # the step
  assert meter.take() == pytest.approx({'input_images_per_second': 32 / 1.6,
                                        'input_wait_fraction': 0.25})
  assert [b['label'].size for b in meter] == [8]  # the rest, counted from the take
  assert meter.take() == pytest.approx({'input_images_per_second': 8 / 0.1,
                                        'input_wait_fraction': 1.0})


@pytest.mark.parametrize('affinity, cpu_count, slurm_tasks, expected', [
    (2, 2, None, 1),        # a 2-core VM: one worker, one core for the training process
    (16, 16, None, 15),
    (240, 240, None, 32),   # a TPU v4 host: the cap
    (128, 128, '8', 15),    # 8 Slurm tasks on a 128-core node, unbound: 16 cores each
    (16, 128, '8', 15),     # bound by Slurm to 16 cores each: the affinity is the share
    (1, 1, None, 1),
])
def test_auto_grain_workers_follow_the_cores(monkeypatch, affinity, cpu_count, slurm_tasks,
                                             expected):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(affinity)), raising=False)
  monkeypatch.setattr(os, 'cpu_count', lambda: cpu_count)
  if slurm_tasks is None:
    monkeypatch.delenv('SLURM_NTASKS_PER_NODE', raising=False)
  else:
    monkeypatch.setenv('SLURM_NTASKS_PER_NODE', slurm_tasks)
  input_pipeline.worker_count.cache_clear()
  try:
    assert input_pipeline.worker_count(-1) == expected
  finally:
    input_pipeline.worker_count.cache_clear()


# ------------------------------------------------------------------------------------------------
# Sharding: 4 devices compute what 1 device computes.


def test_sharded_steps_equal_unsharded(mura_data_dir):
  assert jax.device_count() >= 4, 'conftest sets --xla_force_host_platform_device_count=4'
  # Adam with eps 1e-8 moves each weight by about lr per step whatever the gradient's size, so a
  # gradient at float32 noise level (the two reduction orders' last bits) moves its weight by +-lr
  # on one side and -+lr on the other. eps 1e-3 keeps noise-level gradients at noise level, and
  # lr 1e-2 keeps a real difference (a shard's labels misplaced, statistics of one shard) far
  # above the tolerance.
  config = tiny_config(mura_data_dir, **{'optimizer.learning_rate': 1e-2, 'optimizer.eps': 1e-3})
  model = train_state.network_of(config)
  loss_weights = np.linspace(0.2, 0.8, 14, dtype=np.float32).reshape(7, 2)
  rng = np.random.default_rng(0)
  batches = [{'image': rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8),
              'label': rng.integers(0, 2, 8).astype(np.int32),
              'body_part': rng.integers(0, 7, 8).astype(np.int32)} for _ in range(3)]
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    mesh = parallel.make_mesh(devices)
    steps = train_state.compile_steps(config, model, loss_weights, mesh)
    state = jax.device_put(train_state.initial_state(config, model), parallel.replicated(mesh))
    for batch in batches:
      state, metrics = steps.train(state, parallel.global_batch(batch, mesh))
    results.append(jax.device_get((state.params, state.batch_stats, metrics['loss'])))
  one, four = results
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert not np.allclose(jax.tree.leaves(one[0])[0], jax.tree.leaves(
      jax.device_get(train_state.initial_state(config, model).params))[0]), 'the steps changed the params'


def test_learning_rate_warms_up_linearly_over_the_first_steps(mura_data_dir):
  """optimizer.warmup_epochs (the large-batch configs: 1): update s (1-based) of the first W
  uses lr * s / W, then lr. The first update shows it in the weights too: Adam's moments do not
  depend on the learning rate, so it moves every weight by 1/W of the plain run's move."""
  config = tiny_config(mura_data_dir)
  assert train_state.warmup_steps(config, 287) == 0  # the paper's recipe: none
  config.optimizer.warmup_epochs = 1.0
  assert train_state.warmup_steps(config, 287) == 287
  config.optimizer.warmup_epochs = 0.01
  assert train_state.warmup_steps(config, 13) == 1  # at least one step when asked for
  model = train_state.network_of(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  loss_weights = np.full((7, 2), 0.5, np.float32)
  rng = np.random.default_rng(0)
  batches = [{'image': rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8),
              'label': rng.integers(0, 2, 8).astype(np.int32),
              'body_part': rng.integers(0, 7, 8).astype(np.int32)} for _ in range(6)]
  initial = jax.device_get(train_state.initial_state(config, model).params)
  scales, first_moves = {}, {}
  for warmup in (0, 4):
    steps = train_state.compile_steps(config, model, loss_weights, mesh, warmup=warmup)
    state = jax.device_put(train_state.initial_state(config, model), parallel.replicated(mesh))
    scales[warmup] = []
    for i, batch in enumerate(batches):
      state, metrics = steps.train(state, parallel.global_batch(batch, mesh))
      scales[warmup].append(float(metrics['learning_rate_scale']))
      if i == 0:
        first_moves[warmup] = jax.tree.map(np.subtract, jax.device_get(state.params), initial)
  assert scales[0] == [1.0] * 6
  assert scales[4] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
  for plain, warm in zip(jax.tree.leaves(first_moves[0]), jax.tree.leaves(first_moves[4])):
    np.testing.assert_allclose(warm, plain / 4, rtol=1e-4, atol=1e-7)  # float32 weights: p + u - p
  assert any(np.abs(m).max() > 0 for m in jax.tree.leaves(first_moves[0]))


def test_batch_size_must_divide_over_devices():
  with pytest.raises(ValueError, match='divisible by the 4 devices'):
    parallel.check_batch_size(6, parallel.make_mesh(jax.devices()[:4]))


# ------------------------------------------------------------------------------------------------
# Checkpoints: a preempted run resumes exactly; a checkpoint of another model is refused.


def _latest_params(workdir, config):
  model = train_state.network_of(config)
  latest, _ = checkpoints.managers(workdir, config)
  template = jax.eval_shape(lambda: train_state.initial_state(config, model))
  state, progress = checkpoints.restore_state(latest, template, checkpoints.model_signature(config),
                                              parallel.replicated(parallel.make_mesh()))
  return jax.device_get(state), progress


@pytest.fixture(scope='module')
def straight_run(mura_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('straight')
  config = tiny_config(mura_data_dir)
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['status'] == 'done'
  return workdir, config, summary


def _preempted_then_resumed(config, workdir, monkeypatch, signal_at_step):
  """Trains with a real SIGTERM as the `signal_at_step`-th training batch is read (the loop
  trains it, sees the notice, saves and stops), then again to the end. Returns (first summary,
  second summary, the progress record the second run restored)."""
  real_batches_of, real_restore = input_pipeline.batches_of, checkpoints.restore_state
  calls, restored = {'batches': 0}, []

  def preempted(dataset):
    for batch in real_batches_of(dataset):
      calls['batches'] += 'mask' not in batch  # training batches; validation's have a mask
      if calls['batches'] == signal_at_step and 'mask' not in batch:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  def recording_restore(*args, **kwargs):
    state, progress = real_restore(*args, **kwargs)
    restored.append(dict(progress))
    return state, progress

  monkeypatch.setattr(input_pipeline, 'batches_of', preempted)
  first = train.train_and_evaluate(config, str(workdir))
  monkeypatch.setattr(input_pipeline, 'batches_of', real_batches_of)
  monkeypatch.setattr(checkpoints, 'restore_state', recording_restore)
  second = train.train_and_evaluate(config, str(workdir))
  assert len(restored) == 1
  return first, second, restored[0]


def test_resume_after_sigterm_is_exact(straight_run, tmp_path, monkeypatch):
  straight_dir, config, summary = straight_run
  steps_per_epoch = summary['step'] // config.train.num_epochs
  # A real SIGTERM at the third batch of the second epoch.
  config = tiny_config(config.data.data_dir, **{'train.checkpoint_every_steps': 0})
  first, second, progress = _preempted_then_resumed(config, tmp_path, monkeypatch,
                                                    steps_per_epoch + 3)
  # No periodic checkpoint (checkpoint_every_steps=0): the only save after epoch 1's end is the
  # one SIGTERM makes. Resuming from epoch 1's end instead would replay the 3 batches and still
  # end bitwise equal (training is deterministic): only the restored step tells them apart.
  assert first['status'] == 'preempted' and first['step'] == steps_per_epoch + 3
  assert progress['step'] == first['step'], 'resumed from the SIGTERM save'
  assert (progress['epoch'], progress['batch_in_epoch']) == (1, 3)
  assert second['status'] == 'done' and second['step'] == summary['step']
  straight, _ = _latest_params(straight_dir, config)
  resumed, progress = _latest_params(tmp_path, config)
  assert progress['epoch'] == config.train.num_epochs
  # Bitwise on CPU: same data order, augmentation and optimizer/plateau state.
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_resume_with_dropout_and_unrolled_blocks_is_exact(mura_data_dir, tmp_path, monkeypatch):
  """The dropout keys (fold_in(state.rng, step)) come back with the state: a resumed run draws
  the masks the straight run drew. Dropout turns the scan off (every block unrolled)."""
  config = tiny_config(mura_data_dir, **{'model.drop_rate': 0.3, 'train.num_epochs': 1,
                                         'train.checkpoint_every_steps': 0})
  assert train_state.network_of(config).scan_segment == 0
  summary = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  first, second, progress = _preempted_then_resumed(config, tmp_path / 'resumed', monkeypatch, 5)
  assert first['status'] == 'preempted' and first['step'] == 5
  assert progress['step'] == 5 and progress['batch_in_epoch'] == 5, 'resumed from the SIGTERM save'
  assert second['status'] == 'done' and second['step'] == summary['step']
  straight, _ = _latest_params(tmp_path / 'straight', config)
  resumed, _ = _latest_params(tmp_path / 'resumed', config)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_metrics_and_plateau_in_a_real_run(straight_run):
  import json  # pylint: disable=g-import-not-at-top
  workdir, config, _ = straight_run
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  epochs = [r for r in rows if 'validation_loss' in r]
  assert len(epochs) == config.train.num_epochs
  assert all(0 <= r['auroc/all'] <= 1 and 'kappa/wrist' in r and 'f1/all' in r for r in epochs)
  assert all(r['images_per_second'] > 0 for r in rows if 'train_loss' in r)
  # This host's input, every log step (input_pipeline.InputMeter).
  assert all(r['input_images_per_second'] > 0 and 0 <= r['input_wait_fraction'] <= 1
             for r in rows if 'train_loss' in r)
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    assert list(workdir.glob('events.out.tfevents*')), 'TensorBoard files when TF is installed'
  except ImportError:
    pass
  best = math.inf
  lr = config.optimizer.learning_rate
  for r in epochs:  # the next epoch's lr is / 10 exactly when this epoch did not improve
    improved = r['validation_loss'] < (1 - config.optimizer.plateau_rtol) * best
    best = min(best, r['validation_loss']) if improved else best
    lr = lr if improved else lr / 10
    assert r['learning_rate'] == pytest.approx(lr)


def test_checkpoint_of_another_model_is_refused(straight_run):
  workdir, config, _ = straight_run
  other = tiny_config(config.data.data_dir, **{'model.growth_rate': 6})
  # The recorded config names the change first; told to go on, the checkpoints still refuse.
  with pytest.raises(ConfigError, match=r'model.growth_rate: \d+ in the workdir, 6 now'):
    train.train_and_evaluate(other, str(workdir))
  other.allow_config_change = True
  with pytest.raises(checkpoints.CheckpointMismatchError, match='growth_rate'):
    train.train_and_evaluate(other, str(workdir))


def test_evaluate_best_checkpoint_writes_the_report(straight_run, tmp_path):
  workdir, config, summary = straight_run
  # Three readers who label every validation study (one of them always right).
  studies = input_pipeline.read_split_index(config.data.data_dir, 'validation').studies
  rng = np.random.default_rng(0)
  rows = ['study,r1,r2,r3'] + [
      f'MURA-v1.1/{s}/,{int(s.endswith("positive"))},{rng.integers(2)},{rng.integers(2)}'
      for s in studies]
  (tmp_path / 'readers.csv').write_text('\n'.join(rows) + '\n')
  config = ml_collections.ConfigDict(config.to_dict())
  config.evaluation.readers = str(tmp_path / 'readers.csv')
  report = evaluate.evaluate_checkpoint(config, str(workdir))
  assert report['checkpoint']['step'] == summary['best_step']
  assert report['readers']['names'] == ['r1', 'r2', 'r3']
  assert report['readers']['n_studies'] == len(studies) == report['num_studies']
  out = workdir / 'eval' / 'validation'
  for name in ('report.json', 'report.md', 'predictions.csv', 'study_probabilities.csv', 'roc.png'):
    assert (out / name).exists(), name
  config.evaluation.checkpoint = '12345'
  with pytest.raises(FileNotFoundError, match='No checkpoint at step 12345'):
    evaluate.evaluate_checkpoint(config, str(workdir))


def test_nan_loss_stops_with_a_clear_error(mura_data_dir, tmp_path):
  config = tiny_config(mura_data_dir, **{'optimizer.learning_rate': 1e30, 'train.num_epochs': 1})
  with pytest.raises(train.TrainingDivergedError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert isinstance(error.value, FloatingPointError) and isinstance(error.value, UserError)
  # It names the checkpoint that is on disk, or says there is none (never a step 0 that is not).
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert (f'the last good checkpoint is step {saved[-1]} in {tmp_path}/checkpoints' if saved else
          f'no checkpoint was completed in {tmp_path}/checkpoints') in str(error.value)
  assert 'Lower --config.optimizer.learning_rate' in str(error.value)


def test_a_non_finite_state_is_never_checkpointed(mura_data_dir, tmp_path, monkeypatch):
  # NaN weights after step 4, between log steps (every 1,000) and checkpoints (every 3).
  config = tiny_config(mura_data_dir, **{'train.num_epochs': 1, 'train.log_every_steps': 1000,
                                         'train.checkpoint_every_steps': 3})
  real_compile = train_state.compile_steps

  def poisoned(*args, **kwargs):
    steps = real_compile(*args, **kwargs)
    real_train = steps.train

    def train_step(state, batch):
      state, metrics = real_train(state, batch)
      if int(state.step) == 4:
        state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
      return state, metrics
    train_step.lower = real_train.lower  # compiled ahead of the first batch, as the real one
    steps.train = train_step
    return steps

  monkeypatch.setattr(train_state, 'compile_steps', poisoned)
  with pytest.raises(FloatingPointError, match=r'not finite at step 6 .*nothing was saved: the '
                                               r'last good checkpoint is step 3 in '):
    train.train_and_evaluate(config, str(tmp_path))
  latest, best = checkpoints.managers(tmp_path, config)
  assert latest.all_steps() == [3] and best.all_steps() == []
  state, _ = _latest_params(tmp_path, config)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize('error,failing_save', [
    (OSError(errno.ENOSPC, 'No space left on device'), 2),
    # What orbax's tensorstore raises (orbax 0.12.8, measured on a full tmpfs).
    (ValueError('RESOURCE_EXHAUSTED: Error writing "a/0.0" in OCDBT database at local file: Failed '
                'to write 1251473 bytes to file 4: No space left on device [os_error_code=\'28\']'),
     1)])
def test_a_full_disk_is_a_sentence_and_the_next_run_cleans_up(mura_data_dir, tmp_path, monkeypatch,
                                                              caplog, error, failing_save):
  from mura_jax import main  # pylint: disable=g-import-not-at-top
  config = tiny_config(mura_data_dir, **{'train.num_epochs': 1, 'train.checkpoint_every_steps': 2,
                                         'train.log_every_steps': 1000})
  workdir = tmp_path / 'run'
  real_save, saves = checkpoints.save_state, []

  def save_on_a_disk_that_fills(manager, state, progress):
    saves.append(progress['step'])
    if len(saves) == failing_save:  # orbax leaves the step's temporary folder when it fails
      (manager.directory / f'{progress["step"]}.orbax-checkpoint-tmp').mkdir()
      raise error
    real_save(manager, state, progress)

  monkeypatch.setattr(checkpoints, 'save_state', save_on_a_disk_that_fills)
  with pytest.raises(WorkdirError) as stopped:
    main.run(config, str(workdir))
  last = (f'the last good checkpoint is step {saves[0]} in {workdir}/checkpoints. '
          if failing_save == 2 else
          f'no checkpoint was completed in {workdir}/checkpoints before it. ')
  assert str(stopped.value).startswith(
      f'The disk holding {workdir} is full (No space left on device): the train run stopped; '
      f'{last}Free space there'), str(stopped.value)
  assert str(stopped.value).endswith(
      'run the same command again' + (': training resumes from it' if failing_save == 2 else '')
      + '; the unfinished save is removed at the start.')
  assert stopped.value.__cause__ is error
  assert not (workdir / '.mura-lock').exists()
  partial = workdir / 'checkpoints' / f'{saves[-1]}.orbax-checkpoint-tmp'
  assert partial.exists()
  # The next run removes the unfinished save, saying so, and resumes from the last good one.
  monkeypatch.setattr(checkpoints, 'save_state', real_save)
  with caplog.at_level('WARNING'):
    assert train.train_and_evaluate(config, str(workdir))['status'] == 'done'
  assert 'Removed 1 unfinished checkpoint save(s) left by an earlier run' in caplog.text
  assert str(partial) in caplog.text and not partial.exists()
  assert not list(workdir.glob('*/*.orbax-checkpoint-tmp*'))


def test_orbax_disk_full_tracebacks_are_left_to_the_sentence():
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  def record(message):
    return absl_logging.logging.LogRecord(
        'absl', 40, '/venv/site-packages/orbax/checkpoint/_src/futures/future.py', 1, message,
        None, None)
  full = record("_SignalingThread.run() raised: RESOURCE_EXHAUSTED: ... No space left on device "
                "[os_error_code='28']")
  other = record('_SignalingThread.run() raised: PERMISSION_DENIED')
  quiet = cli.QuietLibraries()  # pylint: disable=protected-access
  assert not quiet.filter(full) and quiet.filter(other)
  assert cli.QuietLibraries(verbose=True).filter(full)  # pylint: disable=protected-access


def test_unbuilt_dataset_says_how_to_build_it(tmp_path):
  config = tiny_config(tmp_path / 'nothing_here')
  with pytest.raises(FileNotFoundError, match='python -m tfds_mura.build'):
    train.train_and_evaluate(config, str(tmp_path / 'work'))


def test_training_from_a_weights_file_resumes_without_it(mura_data_dir, tmp_path):
  """config.model.init='torchvision:PATH' starts from the file; later restores never read it."""
  from mura_jax.models import weights  # pylint: disable=g-import-not-at-top
  config = tiny_config(mura_data_dir, **{'train.num_epochs': 1})
  model = train_state.network_of(config)
  pretrained = train_state.initial_state(tiny_config(mura_data_dir, **{'seed': 7}), model)
  path = tmp_path / 'tiny_densenet.safetensors'
  weights.save_safetensors({'params': pretrained.params, 'batch_stats': pretrained.batch_stats},
                           path, arch=model)
  config.model.init = f'torchvision:{path}'
  start = train_state.initial_state(config, model)
  for a, b in zip(jax.tree.leaves(start.params), jax.tree.leaves(pretrained.params)):
    np.testing.assert_array_equal(a, b)  # the file's weights, not this seed's random ones
  assert train.train_and_evaluate(config, str(tmp_path / 'work'))['status'] == 'done'
  path.unlink()
  config.evaluation.checkpoint = 'latest'
  report = evaluate.evaluate_checkpoint(config, str(tmp_path / 'work'))
  assert report['checkpoint']['step'] > 0
