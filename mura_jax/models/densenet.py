"""DenseNet-BC (Huang et al., 2017) in Flax linen, matching torchvision's architecture exactly.

The paper's model is an ImageNet-initialised DenseNet-169 whose last layer is replaced by one
output. Module and parameter names mirror torchvision's `state_dict` keys, so weight conversion
(`weights.py`) is a readable renaming: torchvision's `features.denseblock1.denselayer1.norm1.weight`
is `params['features']['denseblock1']['denselayer1']['norm1']['scale']` here.

Layout is NHWC; parameters are float32 and `dtype` sets the compute dtype (bfloat16 on
accelerators). Global pooling is a spatial mean, so any input size >= 32 works.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from mura_jax.errors import ConfigError
from mura_jax.models.scanned_block import ScannedDenseBlock, conv_init

ModuleDef = Any

# torchvision's initialisation: kaiming_normal_ (fan_in, gain sqrt(2), untruncated) for convs, the
# nn.Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the classifier weight, a zero bias.
classifier_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
classifier_bias_init = nn.initializers.zeros

# torchvision name -> DenseNet arguments of its four ImageNet models.
ARCHS = {
    'densenet121': dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    'densenet161': dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
    'densenet169': dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    'densenet201': dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
}


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (bn_size * growth) - BN-ReLU-3x3 conv (growth) [- dropout]."""
  growth_rate: int
  bn_size: int
  conv: ModuleDef
  norm: ModuleDef
  dropout: ModuleDef

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    # The layer concatenates its inputs itself, as torchvision's does: under nn.remat only the
    # per-layer outputs are kept and the concatenation and bottleneck are recomputed, which is
    # what keeps the memory-efficient DenseNet (Pleiss et al., 2017) linear in depth.
    x = jnp.concatenate(features, axis=-1)
    x = nn.relu(self.norm(name='norm1')(x))
    x = self.conv(self.bn_size * self.growth_rate, (1, 1), name='conv1')(x)
    x = nn.relu(self.norm(name='norm2')(x))
    x = self.conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name='conv2')(x)
    return self.dropout()(x)


class DenseBlock(nn.Module):
  """`num_layers` dense layers, each one seeing the concatenation of all earlier outputs."""
  num_layers: int
  growth_rate: int
  bn_size: int
  conv: ModuleDef
  norm: ModuleDef
  dropout: ModuleDef
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    layer = nn.remat(DenseLayer) if self.remat else DenseLayer
    features = [x]
    for i in range(self.num_layers):
      features.append(layer(self.growth_rate, self.bn_size, self.conv, self.norm, self.dropout,
                            name=f'denselayer{i + 1}')(features))
    return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
  """BN-ReLU-1x1 conv (halving the channels)-2x2/2 average pool, between two dense blocks."""
  num_features: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(self.norm(name='norm')(x))
    x = self.conv(self.num_features, (1, 1), name='conv')(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Features(nn.Module):
  """torchvision's `features`: conv0, norm0, pool0, dense blocks with transitions, norm5."""
  growth_rate: int
  block_config: Sequence[int]
  num_init_features: int
  bn_size: int
  conv: ModuleDef
  norm: ModuleDef
  blocks: Sequence[ModuleDef]  # per block: DenseBlock or ScannedDenseBlock, all but its sizes given

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(self.num_init_features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                  name='conv0')(x)
    x = nn.relu(self.norm(name='norm0')(x))
    # Flax pads max pooling with -inf, as torch does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    num_features = self.num_init_features
    for i, num_layers in enumerate(self.block_config):
      x = self.blocks[i](num_layers, self.growth_rate, self.bn_size, name=f'denseblock{i + 1}')(x)
      num_features += num_layers * self.growth_rate
      if i != len(self.block_config) - 1:
        num_features //= 2
        x = Transition(num_features, self.conv, self.norm, name=f'transition{i + 1}')(x)
    return self.norm(name='norm5')(x)


class DenseNet(nn.Module):
  """DenseNet-BC as torchvision.models.DenseNet builds it.

  Attributes:
    growth_rate: channels each dense layer adds (k in the DenseNet paper).
    block_config: number of dense layers in each block.
    num_init_features: channels of the first convolution.
    bn_size: bottleneck width, in multiples of growth_rate.
    num_classes: classifier outputs (1 for MURA's abnormality logit).
    drop_rate: dropout after each dense layer, in training only (needs a 'dropout' rng).
    remat: recompute the dense layers in the backward pass (the memory-efficient DenseNet).
    scan_segment: 0 compiles every dense layer on its own (unrolled); n > 0 runs n layers at a
      time in a jax.lax.scan (ScannedDenseBlock) in the blocks after the first `unrolled_blocks`:
      the same results and variables, a shorter compile (BENCHMARKS.md, "DenseNet-169:
      throughput and compile time"), at the cost of zero-padded input channels.
      Needs drop_rate 0.
    unrolled_blocks: with scan_segment > 0, how many dense blocks, from the first, stay
      unrolled. At 56 x 56 and 28 x 28 the scan's zero-padded channels cost more time than the
      blocks' few layers (6 and 12 in every torchvision DenseNet) cost compile (BENCHMARKS.md,
      "DenseNet-169: throughput and compile time").
    dtype: compute dtype; parameters and batch statistics stay float32.
    bn_momentum: Flax convention: 0.9 is torch's momentum 0.1.
    bn_epsilon: torch's 1e-5. Keras' DenseNets use 1.001e-5; `keras_weights.load_keras` folds that
      difference into the running variances, so Keras-converted weights use the default too.

  Batch statistics follow flax.linen.BatchNorm, which differs from torch in one detail: the
  running variance is updated with the biased batch variance, torch's with the unbiased one; with
  n = batch * height * width values per channel they differ by the factor n / (n - 1).
  Normalisation itself (biased variance in training, running statistics in eval) is torch's.
  """
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  num_classes: int = 1000
  drop_rate: float = 0.0
  remat: bool = False
  scan_segment: int = 0
  unrolled_blocks: int = 0
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    """Logits (N, num_classes), float32; with `return_features`, (logits, feature map).

    The feature map is the output of the last BN + ReLU, before pooling: (N, H/32, W/32, C),
    float32. It is the f_k(X) of the paper's class activation maps, whose weights w_k are the
    classifier's kernel.
    """
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_init)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                             epsilon=self.bn_epsilon, dtype=self.dtype)
    if self.scan_segment < 0:
      raise ConfigError(f'scan_segment is {self.scan_segment}: give the dense layers per scan '
                        '(8 is the default), or 0 to unroll them.')
    if self.unrolled_blocks < 0:
      raise ConfigError(f'unrolled_blocks is {self.unrolled_blocks}: give how many dense blocks, '
                        'from the first, stay unrolled with the scan (2 is the default; 0 scans '
                        'them all).')
    if self.scan_segment and self.drop_rate:
      raise ConfigError('scan_segment needs drop_rate 0 (the scanned dense block has no '
                        'dropout); set one of them to 0.')
    dropout = functools.partial(nn.Dropout, rate=self.drop_rate, deterministic=not train)
    unrolled = functools.partial(DenseBlock, conv=conv, norm=norm, dropout=dropout,
                                 remat=self.remat)
    scanned = functools.partial(ScannedDenseBlock, remat=self.remat, segment=self.scan_segment,
                                train=train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                                dtype=self.dtype)
    blocks = tuple(scanned if self.scan_segment and i >= self.unrolled_blocks else unrolled
                   for i in range(len(self.block_config)))
    x = Features(self.growth_rate, tuple(self.block_config), self.num_init_features, self.bn_size,
                 conv, norm, blocks, name='features')(jnp.asarray(x, self.dtype))
    feature_map = nn.relu(x)
    pooled = jnp.mean(feature_map, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=classifier_kernel_init,
                      bias_init=classifier_bias_init, name='classifier')(pooled)
    # The loss, the sigmoid and CAMs are computed in float32 whatever the compute dtype.
    logits = jnp.asarray(logits, jnp.float32)
    if return_features:
      return logits, jnp.asarray(feature_map, jnp.float32)
    return logits


def create_model(arch: str | dict, *, dtype: Any = 'float32', **kwargs) -> DenseNet:
  """The DenseNet torchvision calls `arch` ('densenet169'), or the one a checkpoint's model
  signature describes ({'arch', 'num_classes', ...}; 'custom': its own growth rate, blocks,
  initial features and bottleneck); kwargs override DenseNet attributes (dropout, remat and
  scanning are run-time choices: the variables are the same either way)."""
  signature = arch if isinstance(arch, dict) else {'arch': arch}
  options = {'dtype': jnp.dtype(dtype), **kwargs}
  if 'num_classes' in signature:
    options.setdefault('num_classes', signature['num_classes'])
  if signature['arch'] == 'custom':  # small DenseNets for the demo and the tests
    return DenseNet(growth_rate=signature['growth_rate'],
                    block_config=tuple(signature['block_config']),
                    num_init_features=signature['num_init_features'],
                    bn_size=signature['bn_size'], **options)
  if signature['arch'] not in ARCHS:
    raise ConfigError(f'Unknown arch {signature["arch"]!r}; known: {", ".join(ARCHS)}.')
  return DenseNet(**{**ARCHS[signature['arch']], **options})


DenseNet121 = functools.partial(create_model, 'densenet121')
DenseNet161 = functools.partial(create_model, 'densenet161')
DenseNet169 = functools.partial(create_model, 'densenet169')
DenseNet201 = functools.partial(create_model, 'densenet201')


def init_function(model: DenseNet, image_size: int, in_channels: int):
  """`model.init` as a function of the rng alone. The variables do not depend on the image size;
  32 is the smallest a DenseNet takes and traces fastest."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  return lambda rng: model.init(rng, jnp.zeros(x.shape, x.dtype), train=False)


def init_variables(model: DenseNet | str, rng: jax.Array, image_size: int = 224,
                   in_channels: int = 3) -> dict:
  """Randomly initialised {'params', 'batch_stats'}; conv0 takes `in_channels` channels."""
  if isinstance(model, str):
    model = create_model(model)
  # Jitted: op-by-op initialisation of a full-size DenseNet is much slower than compiling it.
  return dict(jax.jit(init_function(model, image_size, in_channels))(rng))


def variable_shapes(model: DenseNet | str, in_channels: int = 3) -> dict:
  """The shapes (jax.ShapeDtypeStruct) of `init_variables(model, ...)`, without computing them."""
  if isinstance(model, str):
    model = create_model(model)
  # Variable shapes do not depend on the image size; 32 is the smallest a DenseNet takes.
  # (runtime.step_cache.variable_shapes: the same, from a traced program kept across restarts.)
  return dict(jax.eval_shape(init_function(model, 32, in_channels), jax.random.PRNGKey(0)))
