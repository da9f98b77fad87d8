"""The train state and its jitted steps: the network of a config, Adam and the plateau schedule,
the initial state (ImageNet weights or random), the sharded train step, and what inference needs
of a state (its variables)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mura_jax import checkpoints
from mura_jax.data import input_pipeline
from mura_jax.data import preprocessing
from mura_jax.errors import ConfigError
from mura_jax.inference import predictor as predictor_lib
from mura_jax.models import densenet
from mura_jax.models import imagenet
from mura_jax.runtime import parallel
from mura_jax.runtime import step_cache
from mura_jax.training import loss as loss_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any        # Adam's moments
  plateau_state: Any    # optax.contrib.reduce_on_plateau: the learning-rate scale
  rng: jax.Array        # dropout


def network_of(config: ml_collections.ConfigDict) -> densenet.DenseNet:
  """The network of a config: its signature (the checkpoint's model) and run-time options."""
  m = config.model
  return densenet.create_model(checkpoints.model_signature(config), dtype=m.dtype,
                                  drop_rate=m.drop_rate, remat=m.remat,
                                  scan_segment=0 if m.drop_rate else m.scan_segment,
                                  unrolled_blocks=m.unrolled_blocks)


weighted_bce = loss_lib.weighted_bce


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


def warmup_steps(config, steps_per_epoch: int) -> int:
  """Steps of the linear learning-rate warm-up: config.optimizer.warmup_epochs of an epoch's
  steps (at least 1 when it is > 0); 0 = none (the paper's recipe)."""
  epochs = config.optimizer.get('warmup_epochs', 0.0)
  return max(1, round(epochs * steps_per_epoch)) if epochs > 0 else 0


def warmup_scale(step, num_steps: int):
  """The warm-up's factor of the learning rate for the update at `step` (0-based): rising
  linearly, (step + 1) / num_steps, to 1 at the last warm-up step, then 1 (Goyal et al., 2017,
  "Accurate, Large Minibatch SGD", section 2.2's gradual warm-up)."""
  if not num_steps:
    return 1.0
  return jnp.minimum(1.0, (step + 1) / num_steps)


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
    variables = imagenet.initial_variables(config.model.init, model, init_rng,
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
  """Flax's random initialisation (`imagenet.initial_variables('random', ...)`), its traced
  program kept like the train step's (step_cache.py): a restart does not trace the model's init."""
  return dict(step_cache.kept_init(model, in_channels)(rng)[0])


def state_template(config, model) -> TrainState:
  """The state's shapes and dtypes, for restoring: no weights file is read (it may be gone)."""
  random_init = ml_collections.ConfigDict(config.to_dict())
  random_init.model.init = 'random'
  return jax.eval_shape(lambda: initial_state(random_init, model))


def train_step(state: TrainState, batch, *, model, tx, loss_weights, in_channels,
               warmup: int = 0):
  images = preprocessing.normalize(batch['image'], in_channels)
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                  train=True, mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    return weighted_bce(logits[:, 0], batch['label'], batch['body_part'], loss_weights), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  adam_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  # The plateau's scale (per epoch) times the warm-up's (the first `warmup` steps).
  scale = state.plateau_state.scale * warmup_scale(state.step, warmup)
  params = optax.apply_updates(state.params, jax.tree.map(lambda u: scale * u, adam_updates))
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=updates['batch_stats'], opt_state=opt_state)
  return new_state, {'loss': loss, 'learning_rate_scale': scale}


@dataclasses.dataclass
class Steps:
  """The jitted, sharded steps of one run: `train` on a state; `validation`, the predictor whose
  `predict_split` (with the weighted loss) runs on each epoch's variables."""
  train: Any
  validation: predictor_lib.Predictor
  mesh: Any


def compile_steps(config, model, loss_weights, mesh, traced_cache=None,
                  warmup: int = 0) -> Steps:
  """`traced_cache`: where the traced train step is kept (step_cache.py; default beside the
  compilation cache when that is on): a restart skips tracing it. `warmup`: the learning rate's
  warm-up steps (`warmup_steps`)."""
  tx = create_optimizer(config)
  replicated, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  # Everything train_step closes over, for the traced step's key.
  description = (f'train_step of {model!r}\noptimizer {config.optimizer.to_dict()!r}\n'
                 f'loss weights {np.asarray(loss_weights).tolist()!r}\n'
                 f'in_channels {config.model.in_channels}\nwarmup {warmup}')
  train = step_cache.jit(
      functools.partial(train_step, model=model, tx=tx, loss_weights=loss_weights,
                        in_channels=config.model.in_channels, warmup=warmup), description,
      in_shardings=(replicated, data), out_shardings=(replicated, replicated), donate_argnums=(0,),
      directory=traced_cache)
  validation = predictor_lib.Predictor.for_training(
      model, preprocessing.Preprocessing.from_config(config), mesh,
      config.evaluation.global_batch_size)
  return Steps(train, validation, mesh)


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


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every float in the tree (params, batch statistics, Adam's moments) is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
