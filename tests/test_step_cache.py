"""The traced-step cache: a restart loads the traced program instead of tracing, same results."""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mura_jax.runtime import parallel
from mura_jax.runtime import step_cache

from test_train import tiny_config  # pylint: disable=g-bad-import-order
from mura_jax.models import imagenet
from mura_jax.training import state as train_state


@flax.struct.dataclass
class State:
  step: jax.Array
  weights: dict


def make_step(traces: list):
  def step(state, batch):
    traces.append(1)  # runs only when the function is traced
    grad = jax.grad(lambda w: jnp.sum(jnp.tanh(batch['x'] @ w['a']) * w['b']))(state.weights)
    weights = jax.tree.map(lambda w, g: w - 0.1 * g, state.weights, grad)
    return state.replace(step=state.step + 1, weights=weights), {'norm': jnp.sum(grad['a'] ** 2)}
  return step


def inputs(rows=8):
  rng = np.random.default_rng(0)
  weights = {'a': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
             'b': jnp.asarray(rng.normal(size=4), jnp.float32)}
  state = State(step=jnp.asarray(0), weights=weights)
  return state, {'x': jnp.asarray(rng.normal(size=(rows, 3)), jnp.float32)}


def cached(traces, directory, description='step v1'):
  mesh = parallel.make_mesh(jax.devices()[:1])
  replicated, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return step_cache.jit(make_step(traces), description, in_shardings=(replicated, data),
                        out_shardings=(replicated, replicated), donate_argnums=(0,),
                        directory=directory)


def run(step, steps=3, rows=8):
  state, batch = inputs(rows)
  for _ in range(steps):
    state, metrics = step(state, batch)
  return jax.device_get((state, metrics))


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_a_restart_loads_the_traced_step_instead_of_tracing(tmp_path):
  reference = run(jax.jit(make_step([])))
  traces = []
  assert_same(run(cached(traces, tmp_path)), reference)
  assert len(traces) == 1 and len(list(tmp_path.glob('step-*.exported'))) == 1
  restarted = []  # a new process would build the step anew from the same code
  assert_same(run(cached(restarted, tmp_path)), reference)
  assert restarted == [], 'the second start traced the step again'
  assert isinstance(run(cached([], tmp_path))[0], State)  # the outputs' own classes come back


def test_lower_and_compile_take_the_same_pytrees(tmp_path):
  state, batch = inputs()
  compiled = cached([], tmp_path).lower(state, batch).compile()
  new_state, metrics = compiled(state, batch)
  assert int(new_state.step) == 1 and set(metrics) == {'norm'}
  assert 'dot' in compiled.as_text()


def test_whatever_defines_the_program_is_in_the_key(tmp_path, monkeypatch):
  run(cached([], tmp_path))
  other_description = []
  run(cached(other_description, tmp_path, description='step v2'))
  other_shapes = []
  run(cached(other_shapes, tmp_path), rows=16)
  assert other_description == [1] and other_shapes == [1]
  monkeypatch.setattr(step_cache, 'source_digest', lambda: 'edited')
  edited_code = []
  run(cached(edited_code, tmp_path))
  assert edited_code == [1]
  assert len(list(tmp_path.glob('step-*.exported'))) == 4


def test_a_damaged_file_is_traced_again_and_replaced(tmp_path):
  reference = run(cached([], tmp_path))
  (path,) = tmp_path.glob('step-*.exported')
  path.write_bytes(b'not a traced step')
  traces = []
  assert_same(run(cached(traces, tmp_path)), reference)
  assert traces == [1]
  restarted = []
  assert_same(run(cached(restarted, tmp_path)), reference)
  assert restarted == []


def test_an_unwritable_cache_costs_a_trace_not_the_run(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('a file where the cache folder would go')
  traces = []
  assert_same(run(cached(traces, blocker / 'traced')), run(jax.jit(make_step([]))))
  assert traces == [1]


def test_off_without_a_compilation_cache():
  assert jax.config.jax_compilation_cache_dir is None  # tests run without one
  assert step_cache.default_directory() is None
  step = step_cache.jit(make_step([]), 'step', in_shardings=(None, None),
                        out_shardings=(None, None))
  assert not isinstance(step, step_cache.CachedJit)


def test_the_cached_train_step_is_the_train_step(mura_data_dir, tmp_path, monkeypatch):
  """The real train step (tiny DenseNet, 4 devices): loaded from the file, the same numbers as
  traced here, and not traced at the restart."""
  config = tiny_config(mura_data_dir, **{'model.scan_segment': 1})
  model = train_state.network_of(config)
  mesh = parallel.make_mesh(jax.devices()[:4])
  loss_weights = np.linspace(0.2, 0.8, 14, dtype=np.float32).reshape(7, 2)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({'image': rng.integers(0, 256, (8, 32, 32, 1), dtype=np.uint8),
                                 'label': rng.integers(0, 2, 8).astype(np.int32),
                                 'body_part': rng.integers(0, 7, 8).astype(np.int32)}, mesh)
  traces = []
  real_loss = train_state.weighted_bce
  monkeypatch.setattr(train_state, 'weighted_bce', lambda *a: traces.append(1) or real_loss(*a))

  def two_steps(traced_cache):
    steps = train_state.compile_steps(config, model, loss_weights, mesh, traced_cache=traced_cache)
    state = jax.device_put(train_state.initial_state(config, model), parallel.replicated(mesh))
    for _ in range(2):
      state, metrics = steps.train(state, batch)
    return jax.device_get((state.params, state.batch_stats, state.opt_state, metrics))

  plain = two_steps(None)
  assert traces == [1]
  assert_same(two_steps(tmp_path), plain)
  assert traces == [1, 1]
  assert_same(two_steps(tmp_path), plain)
  assert traces == [1, 1], 'the restart traced the train step'
  other = tiny_config(mura_data_dir, **{'model.scan_segment': 1, 'optimizer.learning_rate': 1e-2})
  train_state.compile_steps(other, model, loss_weights, mesh, traced_cache=tmp_path).train.lower(
      train_state.initial_state(other, model), batch)
  assert traces == [1, 1, 1], 'another learning rate must not reuse the traced step'
  assert len(list(tmp_path.glob('train_step-*.exported'))) == 2


def test_random_init_is_flax_init_and_kept(tmp_path, monkeypatch):
  """train_state.random_variables: the variables imagenet.initial_variables('random') gives, and a
  restart does not trace the model's init."""
  from mura_jax.models import densenet  # pylint: disable=g-import-not-at-top
  model = densenet.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2,
                            num_classes=1, scan_segment=2)
  rng = jax.random.PRNGKey(3)
  reference = imagenet.initial_variables('random', model, rng, 64, 1)
  monkeypatch.setattr(step_cache, 'default_directory', lambda: tmp_path)
  traces = []
  real = densenet.init_function

  def counting(*args):
    init = real(*args)
    return lambda r: traces.append(1) or init(r)
  monkeypatch.setattr(densenet, 'init_function', counting)
  assert_same(train_state.random_variables(model, rng, 1), reference)
  assert_same(train_state.random_variables(model, rng, 1), reference)
  assert traces == [1] and len(list(tmp_path.glob('init_variables-*.exported'))) == 1


def test_a_warm_predictor_traces_neither_its_steps_nor_the_init(trained_workdir, synthetic_dir,
                                                               tmp_path, monkeypatch):
  """mura-predict's warm start: the predict and map steps' traced programs, and the init program
  that gives the checkpoint's variable shapes, come from the files; the same probabilities."""
  from mura_jax.inference import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from mura_jax.inference import steps as inference_steps  # pylint: disable=g-import-not-at-top
  from mura_jax.data import images  # pylint: disable=g-import-not-at-top
  from mura_jax.models import densenet  # pylint: disable=g-import-not-at-top
  workdir, _ = trained_workdir
  paths = sorted((synthetic_dir / 'MURA-v1.1' / 'valid' / 'XR_HAND').rglob('image*.png'))
  views = [images.read_image(p) for p in paths if not p.name.startswith('._')][:3]
  reference = predictor_lib.Predictor.from_workdir(workdir, global_batch=8)
  expected = reference.predict_views(views), reference.predict_views_and_maps(views)

  traces = []

  def counted(name, fn):  # fn, noting each call: each trace, for what runs only while tracing
    return lambda *args, **kwargs: traces.append(name) or fn(*args, **kwargs)
  monkeypatch.setattr(inference_steps, 'view_logits', counted('view_logits', inference_steps.view_logits))
  monkeypatch.setattr(inference_steps, 'view_maps', counted('view_maps', inference_steps.view_maps))
  init_function = densenet.init_function  # called outside the trace; the function it returns, in
  monkeypatch.setattr(densenet, 'init_function',
                      lambda *args: counted('init_function', init_function(*args)))
  monkeypatch.setattr(step_cache, 'default_directory', lambda: tmp_path)
  for _ in range(2):  # a cold start, then a warm one (new jitted steps, as a new process has)
    predictor = predictor_lib.Predictor.from_workdir(workdir, global_batch=8)
    probabilities = predictor.predict_views(views)
    with_maps, maps = predictor.predict_views_and_maps(views)
    np.testing.assert_allclose(probabilities, expected[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(with_maps, expected[1][0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(maps, expected[1][1], rtol=0, atol=1e-5)
  assert sorted(traces) == ['init_function', 'view_logits', 'view_maps'], traces
  kept = sorted(p.name.split('-')[0] for p in tmp_path.glob('*.exported'))
  assert kept == ['init_variables', 'map_step', 'predict_step']
