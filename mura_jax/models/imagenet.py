"""ImageNet weights adapted to MURA: the classifier replaced by one abnormality logit, conv0 taking the
gray channel (its RGB filters summed, with the gray statistics), and the initial variables of a run
from config.model.init (torchvision, keras or random)."""

from __future__ import annotations

import jax
import numpy as np

from mura_jax.data.preprocessing import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD
from mura_jax.models.densenet import (DenseNet, classifier_bias_init, classifier_kernel_init,
                                      init_variables)
from mura_jax.models import keras_weights
from mura_jax.models.weights import Variables, load_torchvision


def replace_head(variables: Variables, num_classes: int, rng: jax.Array) -> Variables:
  """A new classifier with `num_classes` outputs, initialised as DenseNet initialises it; the
  backbone and its batch statistics are kept. Works on variables without a classifier too."""
  num_features = variables['params']['features']['norm5']['scale'].shape[0]
  classifier = {
      'kernel': np.asarray(classifier_kernel_init(rng, (num_features, num_classes), np.float32)),
      'bias': np.asarray(classifier_bias_init(rng, (num_classes,), np.float32)),
  }
  return {**variables, 'params': {**variables['params'], 'classifier': classifier}}


def adapt_input_channels(variables: Variables, in_channels: int, *, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, gray_mean: float = GRAY_MEAN,
                         gray_std: float = GRAY_STD) -> Variables:
  """RGB ImageNet weights for MURA's gray radiographs, taken as `in_channels` channels.

  in_channels=3 (replicate): the variables are returned unchanged and the gray image is
    replicated to RGB before the per-channel ImageNet normalisation (`model_input`). Exact: the
    network sees what it would see for a gray photograph.
  in_channels=1 (fold): conv0 takes the gray image normalised once, x = (g - gray_mean) / gray_std.
    The replicated, normalised input of channel c is x * gray_std / std_c + (gray_mean - mean_c)
    / std_c, and conv0 is linear, so conv0 becomes sum_c w_c * gray_std / std_c, and the
    constant sum_{c, taps} w_c * (gray_mean - mean_c) / std_c moves into norm0's running mean
    (batch statistics absorb a constant in training).
    Exact except at conv0's border: torch zero-pads the normalised RGB (a different gray per
    channel), the folded model zero-pads x (gray = gray_mean), so conv0 outputs whose 7x7 window
    reaches the padding (the first 2 and the last 1 or 2 rows and columns of its output) differ by
    the folded constant's padded taps. Choosing gray_mean close to every mean_c keeps that small
    (tests/test_weights.py measures it); gray_mean=0, gray_std=1 takes raw [0, 1] gray input at a
    border error about 20 times larger. Measured on torchvision-initialised densenet169 with
    random batch-norm statistics (no ImageNet file here): max |logit change| / std(logits) was
    0.06% at 224 x 224 and 0.5% at 64 x 64 (1.6% and 11% with raw gray input). Folding saves
    two thirds of conv0's FLOPs, 2.3% of densenet169's 6.66 GFLOP per 224 x 224 image
    (docs/benchmarks-history.md, "Measurements behind choices in the code").
  """
  kernel = np.asarray(variables['params']['features']['conv0']['kernel'], np.float64)
  if kernel.shape[2] == in_channels:
    return variables
  if (kernel.shape[2], in_channels) != (3, 1):
    raise ValueError(f'conv0 takes {kernel.shape[2]} channels; only 3 can be folded to 1, '
                     f'not to {in_channels}.')
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  folded = np.sum(kernel * (gray_std / std)[:, None], axis=2, keepdims=True)
  shift = np.einsum('hwco,c->o', kernel, (gray_mean - mean) / std)
  norm0 = variables['batch_stats']['features']['norm0']
  params = {**variables['params'], 'features': {**variables['params']['features'],
                                                'conv0': {'kernel': folded.astype(np.float32)}}}
  batch_stats = {**variables['batch_stats'], 'features': {
      **variables['batch_stats']['features'],
      'norm0': {**norm0, 'mean': (np.float64(norm0['mean']) - shift).astype(np.float32)}}}
  return {**variables, 'params': params, 'batch_stats': batch_stats}


def initial_variables(init: str, model: DenseNet, rng: jax.Array, image_size: int = 224,
                      in_channels: int = 3, num_classes: int | None = None) -> Variables:
  """The variables `config.model.init` asks for: 'random', 'torchvision:PATH' or 'keras:PATH'.

  ImageNet weights keep their backbone; conv0 is folded to one channel when in_channels=1
  (`adapt_input_channels`); the classifier is re-initialised unless it already has
  `num_classes` (default: model.num_classes) outputs.
  """
  if num_classes is not None and num_classes != model.num_classes:
    raise ValueError(f'num_classes={num_classes} but the model has {model.num_classes}.')
  kind, _, path = init.partition(':')
  if init == 'random':
    return init_variables(model, rng, image_size, in_channels)
  if kind == 'torchvision' and path:
    variables = load_torchvision(path, arch=model)
  elif kind == 'keras' and path:
    variables = keras_weights.load_keras(path, arch=model)
  else:
    raise ValueError(f"config.model.init must be 'random', 'torchvision:PATH' or 'keras:PATH', "
                     f'not {init!r}.')
  variables = adapt_input_channels(variables, in_channels)
  classifier = variables['params'].get('classifier')
  if classifier is None or classifier['kernel'].shape[1] != model.num_classes:
    variables = replace_head(variables, model.num_classes, rng)
  return variables
