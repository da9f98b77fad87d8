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
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from mura_jax.errors import ConfigError

ModuleDef = Any

# torchvision's initialisation: kaiming_normal_ (fan_in, gain sqrt(2), untruncated) for convs, the
# nn.Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the classifier weight, a zero bias.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')
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


# ------------------------------------------------------------------------------------------------
# The scanned dense block: the same layers, compiled once per segment instead of once per layer.
#
# Unrolled, XLA compiles each of densenet169's 82 dense layers separately (each sees a different
# number of input channels), which is most of the train step's compile time. The scanned block
# keeps one feature buffer per block (all its channels, the unwritten ones zero) and runs
# `scan_segment` layers at a time with jax.lax.scan: within a segment every layer reads the
# buffer's first `width` channels (the widest input of the segment) and writes its `growth_rate`
# new channels in place (dynamic_update_slice). A layer's parameters are zero-padded to `width`
# input channels, so the padded channels contribute exact zeros: the results are the unrolled
# block's, the parameters keep their names and shapes (checkpoints, weight files and the parity
# tests do not change), and the padded channels cost extra multiply-adds in the 1 x 1
# convolutions (at most segment - 1 layers' growth per layer). The backward pass is the segment's
# own (`_scan_segment_backward`): it reads every layer's input from the segment's output instead
# of keeping a copy per layer.


class _BatchNormVariables(nn.Module):
  """flax.linen.BatchNorm's variables (same names, shapes and initial values), without its call."""
  features: int

  @nn.compact
  def __call__(self):
    shape = (self.features,)
    return dict(scale=self.param('scale', nn.initializers.ones, shape, jnp.float32),
                bias=self.param('bias', nn.initializers.zeros, shape, jnp.float32),
                mean=self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), shape),
                var=self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), shape))


class _ConvKernel(nn.Module):
  """flax.linen.Conv's kernel (no bias), without its call."""
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self):
    return self.param('kernel', conv_init, self.shape, jnp.float32)


class _DenseLayerVariables(nn.Module):
  """The variables of one DenseLayer, named as DenseLayer names them."""
  in_features: int
  growth_rate: int
  bn_size: int

  @nn.compact
  def __call__(self):
    width = self.bn_size * self.growth_rate
    return dict(norm1=_BatchNormVariables(self.in_features, name='norm1')(),
                conv1=_ConvKernel((1, 1, self.in_features, width), name='conv1')(),
                norm2=_BatchNormVariables(width, name='norm2')(),
                conv2=_ConvKernel((3, 3, width, self.growth_rate), name='conv2')())


def batch_norm(x, scale, bias, mean, var, *, train: bool, epsilon: float, dtype):
  """flax.linen.BatchNorm's arithmetic: (normalised x, the statistics used)."""
  if train:  # biased batch statistics over N, H, W in float32, as _compute_stats computes them
    xf = x.astype(jnp.promote_types(dtype, jnp.float32))
    mean = xf.mean((0, 1, 2))
    var = jnp.maximum(0.0, jnp.square(xf).mean((0, 1, 2)) - jnp.square(mean))
  y = (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
  return y.astype(dtype), (mean, var)


def conv1x1(x, kernel, dtype):
  """A 1 x 1 convolution (HWIO kernel) as the matmul it is; its gradients are matmuls too."""
  return jnp.einsum('nhwc,cd->nhwd', x.astype(dtype), kernel[0, 0].astype(dtype))


def _conv3x3(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@jax.custom_vjp
def conv3x3(x, kernel):
  """flax.linen.Conv's 3 x 3, stride 1, padding 1 convolution (NHWC, HWIO, no bias)."""
  return _conv3x3(x, kernel)


def _conv3x3_forward(x, kernel):
  return conv3x3(x, kernel), (x, kernel)


def _conv3x3_backward(residuals, dy):
  """Both gradients in forms XLA:CPU runs fast inside a loop (measured: 12x slower otherwise).

  Autodiff writes the kernel gradient as a convolution whose window is the whole image and the
  input gradient with the kernel in HWOI order; unrolled, XLA rewrites both for its fast
  (YNNPACK) kernels, inside a scan's loop it does not, and Eigen's general convolution runs them.
  Here the input gradient is a plain HWIO convolution of dy with the kernel flipped and its
  channels swapped, and the kernel gradient, dW[i, j] = sum over pixels p of x[p] dy[p + 1 - (i, j)],
  is one matmul of x against dy's 9 shifts side by side.
  """
  x, kernel = residuals
  dx = _conv3x3(dy, kernel[::-1, ::-1].transpose(0, 1, 3, 2))
  h, w = dy.shape[1:3]
  padded = jnp.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
  shifts = jnp.concatenate([padded[:, 2 - i:2 - i + h, 2 - j:2 - j + w]
                            for i in range(3) for j in range(3)], axis=-1)
  dkernel = jnp.einsum('nhwd,nhwc->dc', shifts, x)  # (9 * out, in)
  dkernel = dkernel.reshape(3, 3, dy.shape[-1], x.shape[-1]).transpose(0, 1, 3, 2)
  return dx, dkernel.astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)


def _pad_channels(a, width: int, value: float = 0.0, axis: int = -1):
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, width - a.shape[axis])
  return jnp.pad(a, pad, constant_values=value)


class ScannedDenseBlock(nn.Module):
  """DenseBlock's layers and variables, `segment` layers per jax.lax.scan (see above)."""
  num_layers: int
  growth_rate: int
  bn_size: int
  segment: int
  train: bool
  momentum: float
  epsilon: float
  dtype: Any
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, in_features = self.growth_rate, x.shape[-1]
    layers = [_DenseLayerVariables(in_features + i * k, k, self.bn_size,
                                   name=f'denselayer{i + 1}')() for i in range(self.num_layers)]
    features = _pad_channels(x.astype(self.dtype), in_features + self.num_layers * k)
    if self.is_initializing():
      # Creating the variables needs only the output's shape: the segments are not traced
      # (model.init and the weight loaders' shape checks trace in a fraction of the time).
      return features
    for start in range(0, self.num_layers, self.segment):
      segment = layers[start:start + self.segment]
      width = in_features + (start + len(segment) - 1) * k  # the segment's widest input
      stacked = jax.tree.map(lambda *a: jnp.stack(a), *[_padded(l, width) for l in segment])
      layout = _Segment(width, in_features + start * k, k, self.train, self.epsilon,
                        jnp.dtype(self.dtype), self.remat)
      features, stats = _scan_segment(features, stacked, layout)
      if self.train:
        # Each layer's running averages of its own channels, as BatchNorm updates them.
        for i, layer in enumerate(segment):
          for norm in ('norm1', 'norm2'):
            for name in ('mean', 'var'):
              v = layer[norm][name]
              v.value = (self.momentum * v.value +
                         (1 - self.momentum) * stats[norm][name][i, :v.value.shape[0]])
    return features


class _Segment(NamedTuple):
  """What a segment's scan needs to know besides its arrays (static, hashable)."""
  width: int          # channels every layer of the segment reads
  offset: int         # where the segment's first layer writes
  growth_rate: int
  train: bool
  epsilon: float
  dtype: Any
  remat: bool

  def bottleneck(self, x, p):
    """BN-ReLU-1 x 1 conv: (h, batch statistics)."""
    y, stats = batch_norm(x, **p['norm1'], train=self.train, epsilon=self.epsilon, dtype=self.dtype)
    return conv1x1(nn.relu(y), p['conv1'], self.dtype), stats

  def new_features(self, h, p):
    """BN-ReLU-3 x 3 conv: (the layer's growth_rate channels, batch statistics)."""
    y, stats = batch_norm(h, **p['norm2'], train=self.train, epsilon=self.epsilon, dtype=self.dtype)
    return conv3x3(nn.relu(y), p['conv2'].astype(self.dtype)), stats

  def offsets(self, num_layers: int):
    return self.offset + self.growth_rate * jnp.arange(num_layers)


def _segment_forward(features, stacked, layout: _Segment):
  """The segment's layers in order: (features with theirs written, statistics, bottlenecks)."""
  def step(features, inputs):
    p, offset = inputs
    h, stats1 = layout.bottleneck(features[..., :layout.width], p)
    y, stats2 = layout.new_features(h, p)
    features = jax.lax.dynamic_update_slice_in_dim(features, y.astype(features.dtype), offset,
                                                   axis=3)
    stats = dict(norm1=dict(zip(('mean', 'var'), stats1)), norm2=dict(zip(('mean', 'var'), stats2)))
    return features, (stats, None if layout.remat else h)

  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  return jax.lax.scan(step, features, (stacked, layout.offsets(num_layers)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scan_segment(features, stacked, layout: _Segment):
  """A segment of dense layers: (features with their channels written, their batch statistics)."""
  features, (stats, _) = _segment_forward(features, stacked, layout)
  return features, stats


def _scan_segment_forward(features, stacked, layout: _Segment):
  features, (stats, bottlenecks) = _segment_forward(features, stacked, layout)
  return (features, stats), (features, stacked, bottlenecks)


def _scan_segment_backward(layout: _Segment, residuals, cotangents):
  """The segment's backward pass, layer by layer in reverse, from the segment's output.

  Autodiff of the scan would keep each layer's input and intermediates, copying them into stacked
  arrays every step (measured: about a quarter of the train step). Instead each layer's input is
  read again from the segment's output, whose channels past the layer's own input hold later
  layers' features: the layer's zero-padded scale, bias and kernel rows give them zero weight and
  zero gradient, so the values and gradients are exact. Only the bottleneck outputs (h, 4k
  channels a layer) are kept, none with remat. The statistics' cotangents are ignored: they feed
  the running averages, which nothing differentiates.
  """
  output, stacked, bottlenecks = residuals
  d_features, _ = cotangents
  k = layout.growth_rate

  def step(d_features, inputs):
    p, offset, h = inputs
    x = output[..., :layout.width]
    recomputed, bottleneck_vjp = jax.vjp(lambda x, p: layout.bottleneck(x, p)[0], x, p)
    h = recomputed if h is None else h  # remat kept none: the vjp's own forward gives it
    _, new_features_vjp = jax.vjp(lambda h, p: layout.new_features(h, p)[0], h, p)
    # This layer's own channels: their cotangent, then zero (they were not the segment's input).
    dy = jax.lax.dynamic_slice_in_dim(d_features, offset, k, axis=3)
    d_features = jax.lax.dynamic_update_slice_in_dim(d_features, jnp.zeros_like(dy), offset,
                                                     axis=3)
    dh, dp2 = new_features_vjp(dy.astype(layout.dtype))
    dx, dp1 = bottleneck_vjp(dh)
    d_features = d_features.at[..., :layout.width].add(dx.astype(d_features.dtype))
    return d_features, jax.tree.map(jnp.add, dp1, dp2)

  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  d_features, d_stacked = jax.lax.scan(
      step, d_features, (stacked, layout.offsets(num_layers), bottlenecks), reverse=True)
  return d_features, d_stacked


_scan_segment.defvjp(_scan_segment_forward, _scan_segment_backward)


def _padded(layer: dict, width: int) -> dict:
  """A layer's variables as arrays, its input's (norm1, conv1) zero-padded to `width` channels.

  Padded channels are zero in the buffer, and scale, bias and kernel rows zero make them
  contribute exact zeros (a padded running variance of 1 keeps the division finite)."""
  value = lambda v: v.value if isinstance(v, nn.Variable) else v
  norm1 = {n: _pad_channels(value(v), width, 1.0 if n == 'var' else 0.0)
           for n, v in layer['norm1'].items()}
  return dict(norm1=norm1, conv1=_pad_channels(layer['conv1'], width, axis=2),
              norm2={n: value(v) for n, v in layer['norm2'].items()}, conv2=layer['conv2'])


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
      the same results and variables, a shorter compile (densenet169's train step on 2 CPU
      cores: 21-27 s with 8, 40-49 s unrolled), at the cost of zero-padded input channels.
      Needs drop_rate 0.
    unrolled_blocks: with scan_segment > 0, how many dense blocks, from the first, stay
      unrolled. At 56 x 56 and 28 x 28 the scan's zero-padded channels cost more time than the
      blocks' few layers (6 and 12 in every torchvision DenseNet) cost compile: densenet169's
      train step on 2 CPU cores runs at 4.3-4.4 img/s with 2 against 3.6-3.9 with none, and
      compiles in 21 s either way (BENCHMARKS.md).
    dtype: compute dtype; parameters and batch statistics stay float32.
    bn_momentum: Flax convention: 0.9 is torch's momentum 0.1.
    bn_epsilon: torch's 1e-5. Keras' DenseNets use 1.001e-5; `weights.load_keras` folds that
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


def create_model(arch: str, **kwargs) -> DenseNet:
  """The DenseNet torchvision calls `arch` ('densenet169'); kwargs override DenseNet attributes."""
  if arch not in ARCHS:
    raise ConfigError(f'Unknown arch {arch!r}; known: {", ".join(ARCHS)}.')
  return DenseNet(**{**ARCHS[arch], **kwargs})


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


def kept_init(model: DenseNet, in_channels: int):
  """`model.init` (32 x 32 input) jitted as a function of the rng returning a 1-tuple, its traced
  program kept like the train step's (step_cache.py): a restart traces the model neither to
  initialise it (train.random_variables) nor to learn its variables' shapes (variable_shapes)."""
  from mura_jax import step_cache  # pylint: disable=g-import-not-at-top  (jax only, no models)
  init = init_function(model, 32, in_channels)

  def init_variables(rng):
    return (init(rng),)
  return step_cache.jit(init_variables, f'init of {model!r}, in_channels {in_channels}',
                        in_shardings=(None,), out_shardings=(None,))


def variable_shapes(model: DenseNet | str, in_channels: int = 3) -> dict:
  """The shapes (jax.ShapeDtypeStruct) of `init_variables(model, ...)`, without computing them."""
  if isinstance(model, str):
    model = create_model(model)
  # Variable shapes do not depend on the image size; 32 is the smallest a DenseNet takes. The
  # rng as training's (jax.random.PRNGKey), so that both find the same kept init program.
  return dict(jax.eval_shape(kept_init(model, in_channels), jax.random.PRNGKey(0))[0])
