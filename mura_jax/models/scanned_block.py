"""The scanned dense block: the same dense layers as DenseBlock, compiled once per segment instead
of once per layer (config.model.scan_segment), with the same variables.

Unrolled, XLA compiles each of densenet169's 82 dense layers separately (each sees a different
number of input channels), which is most of the train step's compile time. The scanned block
keeps one feature buffer per block (all its channels, the unwritten ones zero) and runs
`scan_segment` layers at a time with jax.lax.scan: within a segment every layer reads the
buffer's first `width` channels (the widest input of the segment) and writes its `growth_rate`
new channels in place (dynamic_update_slice). A layer's parameters are zero-padded to `width`
input channels, so the padded channels contribute exact zeros: the results are the unrolled
block's, the parameters keep their names and shapes (checkpoints, weight files and the parity
tests do not change), and the padded channels cost extra multiply-adds in the 1 x 1
convolutions (at most segment - 1 layers' growth per layer). The backward pass is the segment's
own (`_scan_segment_backward`): it reads every layer's input from the segment's output instead
of keeping a copy per layer.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# He initialisation of the convolutions, as torchvision's DenseNet (densenet.py uses it too).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


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
