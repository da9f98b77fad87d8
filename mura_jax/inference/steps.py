"""The inference steps a `Predictor` compiles: views -> logits, probabilities, weighted losses and
class activation maps, jitted over a batch sharded across all devices, and the loop that runs a
step over a whole split (each view exactly once, in the split's order)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mura_jax.data import input_pipeline
from mura_jax.data import preprocessing as preprocessing_lib
from mura_jax.errors import ConfigError
from mura_jax.models import densenet
from mura_jax.runtime import parallel
from mura_jax.runtime import step_cache
from mura_jax.training import loss as loss_lib


def view_logits(variables, images, *, model: densenet.DenseNet, in_channels: int):
  """uint8 (B, S, S, 1) views -> (B,) abnormality logits (eval mode: BN running statistics)."""
  x = preprocessing_lib.normalize(images, in_channels)
  return model.apply(variables, x, train=False)[:, 0]


TTA_MODES = ('none', 'flip')


def flip_tta_logits(variables, images, *, model, in_channels: int):
  """Flip test-time augmentation: the logit of the mean probability of each view and its lateral
  mirror (the flip the training augmentation draws), so that sigmoid of it is that mean."""
  both = jnp.concatenate([images, images[:, :, ::-1]])  # one forward pass over both
  logits = view_logits(variables, both, model=model, in_channels=in_channels).reshape(2, -1)
  log_p = jax.nn.log_sigmoid(logits)  # log p and log(1 - p) of the mean, computed stably
  log_q = jax.nn.log_sigmoid(-logits)
  return (jax.scipy.special.logsumexp(log_p, axis=0) -
          jax.scipy.special.logsumexp(log_q, axis=0))


def predict_step(variables, batch, *, model, in_channels, loss_weights=None, tta='none'):
  """Per-view probabilities and logits (and, given loss weights and labels, the paper's weighted
  loss of the logits).

  tta='flip': the probability (and loss) of the mean of the view's and its mirror's probabilities.
  """
  if tta == 'flip':
    logits = flip_tta_logits(variables, batch['image'], model=model, in_channels=in_channels)
  elif tta == 'none':
    logits = view_logits(variables, batch['image'], model=model, in_channels=in_channels)
  else:
    raise ConfigError(f'tta={tta!r}; expected one of {TTA_MODES} (config.evaluation.tta)')
  out = {'probability': jax.nn.sigmoid(logits), 'logit': logits, 'index': batch['index'],
         'mask': batch['mask']}
  if loss_weights is not None:
    per_view = loss_lib.weighted_bce_per_view(logits, batch['label'], batch['body_part'],
                                              loss_weights)
    out['loss'] = per_view * batch['mask']
  return out


def inference_network(model: densenet.DenseNet) -> densenet.DenseNet:
  """The network the inference steps compile: the dense blocks unrolled.

  Scanned blocks (config.model.scan_segment) shorten the train step's compile; a forward pass
  compiles in seconds either way and runs faster unrolled, without the scan's zero-padded
  channels (BENCHMARKS.md, "XLA:CPU's convolutions"). The variables and results are the same
  (tests/test_densenet.py)."""
  return model.clone(scan_segment=0) if model.scan_segment else model


def _jit_over(step, mesh, description: str):
  """A step on (variables, batch), jitted: variables replicated, the batch split over the mesh's
  devices. Its traced program is kept like the train step's (step_cache.py; `description` names
  everything it closes over), so a warm `mura-predict` or evaluation does not trace the network."""
  def inference_step(variables, batch):
    return (step(variables, batch),)  # step_cache.jit's steps return tuples
  inference_step.__name__ = step.func.__name__  # the traced program's file name
  jitted = step_cache.jit(inference_step, description,
                          in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                          out_shardings=(parallel.replicated(mesh),))
  return _FirstOutput(jitted)


class _FirstOutput:
  """The jitted inference step, called (and lowered) like the step it wraps."""

  def __init__(self, jitted):
    self._jitted = jitted

  def __call__(self, variables, batch):
    return self._jitted(variables, batch)[0]

  def lower(self, variables, batch):
    return self._jitted.lower(variables, batch)


def compile_predict_step(model, in_channels: int, mesh, loss_weights=None, tta: str = 'none'):
  """`predict_step` of the inference network, jitted over the mesh."""
  network = inference_network(model)
  weights = None if loss_weights is None else np.asarray(loss_weights).tolist()
  return _jit_over(functools.partial(predict_step, model=network, in_channels=in_channels,
                                     loss_weights=loss_weights, tta=tta), mesh,
                   f'predict_step of {network!r}\nin_channels {in_channels}\n'
                   f'loss weights {weights!r}\ntta {tta}')


def view_maps(variables, images, *, model, in_channels: int, flip_average: bool = False):
  """uint8 (B, S, S, 1) views -> logits (B,) and the class activation maps (cam.py)
  M = sum_k w_k f_k (B, h, w) in logit units: the last BN + ReLU features weighted by the
  classifier, so that mean(M) + bias is the logit.

  flip_average (config.cam.flip_average): M is the mean of the view's map and its lateral
  mirror's map mirrored back, one forward pass over both. The network is trained on views and
  their mirrors alike, yet where it puts a feature's evidence is its own: the demo's plain maps
  peak a cell beside the abnormality, to the same side in most views (BENCHMARKS.md, "Mirror-
  averaged maps"); the mirror's map errs to the other side. mean(M) + bias is then the mean of
  the two logits; the logits returned stay the view's own (the prediction evaluated).
  """
  x = preprocessing_lib.normalize(images, in_channels)
  if flip_average:
    x = jnp.concatenate([x, x[:, :, ::-1]])
  logits, features = model.apply(variables, x, train=False, return_features=True)
  kernel = jnp.asarray(variables['params']['classifier']['kernel'][:, 0], jnp.float32)
  maps = jnp.einsum('bhwc,c->bhw', features, kernel)
  if flip_average:
    n = images.shape[0]  # slices, not a split: export's batch size is symbolic
    return logits[:n, 0], (maps[:n] + maps[n:, :, ::-1]) / 2
  return logits[:, 0], maps


def map_step(variables, batch, *, model, in_channels: int, flip_average: bool = False):
  logits, maps = view_maps(variables, batch['image'], model=model, in_channels=in_channels,
                           flip_average=flip_average)
  return {'probability': jax.nn.sigmoid(logits), 'logit': logits, 'map': maps,
          'index': batch['index'], 'mask': batch['mask']}


def compile_map_step(model, in_channels: int, mesh, flip_average: bool = False):
  """`map_step`, jitted and sharded like `predict_step` (for `predict_split`)."""
  network = inference_network(model)
  return _jit_over(functools.partial(map_step, model=network, in_channels=in_channels,
                                     flip_average=flip_average), mesh,
                   f'map_step of {network!r}\nin_channels {in_channels}\n'
                   f'flip_average {flip_average}')


def classifier_bias(variables) -> float:
  return float(np.asarray(variables['params']['classifier']['bias'])[0])


def predict_split(step, variables, source, *, mesh, global_batch: int,
                  preprocessing: preprocessing_lib.Preprocessing, num_workers: int = 0,
                  progress: bool = False) -> dict[str, np.ndarray]:
  """Per-view outputs of `step` (each key but 'index' and 'mask': 'probability', 'loss' if it
  computes one, ...) over a whole split, each view exactly once, in the split's order; every
  host reads only its shard."""
  n = len(source)
  outputs: dict[str, np.ndarray] = {}
  seen = np.zeros(n, np.int64)
  batches = input_pipeline.eval_batches(
      source, global_batch=global_batch, image_size=preprocessing.image_size,
      resize=preprocessing.resize, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=num_workers)
  bar = _progress(-(-n // global_batch), 'predict') if progress else None
  for local in input_pipeline.batches_of(batches):
    out = jax.device_get(step(variables, parallel.global_batch(local, mesh)))
    valid = out['mask'] > 0
    index = out['index'][valid]
    for key, value in out.items():  # 'probability', 'loss' if computed, 'map' (cam.py), ...
      if key not in ('index', 'mask'):
        outputs.setdefault(key, np.zeros((n,) + value.shape[1:], np.float64))[index] = value[valid]
    np.add.at(seen, index, 1)
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  if not np.all(seen == 1):
    raise AssertionError(f'prediction saw views {np.flatnonzero(seen != 1)[:10]} not exactly once')
  return outputs


def fitted_batch(num_views: int, global_batch: int, num_devices: int) -> int:
  """The batch for a few views in memory (`mura-predict`): the smallest num_devices x 2^k that
  holds them, at most `global_batch`. A study of 3 views then runs as a batch of 4, not as
  mura-predict's 32, mostly padding (docs/benchmarks-history.md,
  "Measurements behind choices in the code"); the
  sizes stay few, each compiled once and kept by the compilation cache."""
  batch = num_devices
  while batch < num_views and batch < global_batch:
    batch *= 2
  return min(batch, global_batch)


def _progress(total: int, desc: str):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, unit='batch', desc=desc, dynamic_ncols=True,
              disable=jax.process_index() > 0)


class ViewSource:
  """Gray views in memory as a random-access source, read like a TFDS split."""

  def __init__(self, views):
    self._views = list(views)

  def __len__(self):
    return len(self._views)

  def __getitem__(self, i):
    return {'image': np.asarray(self._views[i], np.uint8), 'label': 0, 'body_part': 0}
