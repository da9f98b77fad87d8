"""Where a DenseNet-169 train step spends its time, op by op, JAX (XLA:CPU) against torch (oneDNN).

    python benchmarks/dense_layer_ops.py [--ops conv1x1,conv3x3,bnrelu] [--repeats 20]

Shapes are those of DenseNet-169's dense layers at batch 8, 224 px: the first and the last layer of
each dense block (the 1x1 bottleneck conv to 128 channels over the concatenated input, the 3x3 conv
128 -> 32, batch norm + ReLU in training mode). Each op is timed forward only and forward +
backward (gradients of the input and the weights), jitted in JAX; torch eager with
torch.set_num_threads(len(os.sched_getaffinity(0))). Variants of the JAX 1x1 conv: lax.conv (what flax.linen.Conv
emits) and a dot_general over the channel axis (the same arithmetic as a matmul). Milliseconds,
median of --repeats calls after warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# (name, spatial, input channels) of DenseNet-169's dense layers: first and last of each block.
LAYERS = (('block1 first', 56, 64), ('block1 last', 56, 224), ('block2 first', 28, 128),
          ('block2 last', 28, 480), ('block3 first', 14, 256), ('block3 last', 14, 1248),
          ('block4 first', 7, 640), ('block4 last', 7, 1632))


def median_ms(fn, repeats):
  fn()
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def jax_ops(batch, s, c):
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(batch, s, s, c).astype(np.float32))
  w1 = jnp.asarray(rs.randn(1, 1, c, 128).astype(np.float32) * 0.05)
  h = jnp.asarray(rs.randn(batch, s, s, 128).astype(np.float32))
  w3 = jnp.asarray(rs.randn(3, 3, 128, 32).astype(np.float32) * 0.05)
  dn = ('NHWC', 'HWIO', 'NHWC')

  def conv1(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'VALID', dimension_numbers=dn)

  def dot1(x, w):
    return jax.lax.dot_general(x, w[0, 0], (((3,), (0,)), ((), ())))

  def conv3(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)

  def bnrelu(x, scale):
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.mean(jnp.square(x), (0, 1, 2)) - jnp.square(mean)
    return jax.nn.relu((x - mean) * jax.lax.rsqrt(var + 1e-5) * scale)

  def grad_of(f):
    return jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) * 1.0001), argnums=(0, 1)))

  scale = jnp.ones((c,), jnp.float32)
  out = {}
  for name, f, args in (('conv1x1 lax.conv', conv1, (x, w1)), ('conv1x1 dot_general', dot1, (x, w1)),
                        ('conv3x3 lax.conv', conv3, (h, w3)), ('bn+relu', bnrelu, (x, scale))):
    fwd, fb = jax.jit(f), grad_of(f)
    out[name] = (median_ms(lambda: jax.block_until_ready(fwd(*args)), ARGS.repeats),
                 median_ms(lambda: jax.block_until_ready(fb(*args)), ARGS.repeats))
  return out


def torch_ops(batch, s, c):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  x = torch.randn(batch, c, s, s, requires_grad=True)
  h = torch.randn(batch, 128, s, s, requires_grad=True)
  conv1 = torch.nn.Conv2d(c, 128, 1, bias=False)
  conv3 = torch.nn.Conv2d(128, 32, 3, padding=1, bias=False)
  bn = torch.nn.BatchNorm2d(c).train()
  out = {}
  for name, f, inp in (('conv1x1', conv1, x), ('conv3x3', conv3, h),
                       ('bn+relu', lambda t: torch.relu(bn(t)), x)):
    def fwd():
      with torch.no_grad():
        f(inp)

    def fb():
      f(inp).sum().backward()
    out[name] = (median_ms(fwd, ARGS.repeats), median_ms(fb, ARGS.repeats))
  return out


def main():
  global ARGS
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=10)
  ARGS = parser.parse_args()
  print(f'load {os.getloadavg()[0]:.2f}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print('| layer | op | jax fwd ms | jax fwd+bwd ms | torch fwd ms | torch fwd+bwd ms |')
  print('|---|---|---:|---:|---:|---:|')
  totals = {}
  for name, s, c in LAYERS:
    j, t = jax_ops(ARGS.batch, s, c), torch_ops(ARGS.batch, s, c)
    for op, (f, fb) in j.items():
      tk = 'conv1x1' if op.startswith('conv1x1') else op.split(' ')[0]
      tf, tfb = t[tk]
      print(f'| {name} ({s}x{s}, {c} ch) | {op} | {f:.2f} | {fb:.2f} | {tf:.2f} | {tfb:.2f} |')
      totals.setdefault(op, [0, 0, 0, 0])
      for i, v in enumerate((f, fb, tf, tfb)):
        totals[op][i] += v
  for op, v in totals.items():
    print(f'| sum of the 8 layers | {op} | {v[0]:.1f} | {v[1]:.1f} | {v[2]:.1f} | {v[3]:.1f} |')
  print(f'load {os.getloadavg()[0]:.2f} at the end')


if __name__ == '__main__':
  main()
