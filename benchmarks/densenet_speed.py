"""DenseNet forward and train-step throughput and compile time; prints one markdown table row.

    python benchmarks/densenet_speed.py --arch densenet169 --image-size 224 --batch-size 8 \
        --dtype float32 --steps 5 [--in-channels 1] [--remat] [--header]

The train step is the paper's: one sigmoid output, binary cross-entropy, Adam (lr 1e-4), batch-norm
statistics updated. Variables are random (speed does not depend on their values). Compile time is
jit's lower + compile; throughput is images per second over `--steps` calls after one warm-up call.
`--in-channels 1` runs the folded one-channel conv0 (imagenet.adapt_input_channels), 3 the RGB one
that gray images are replicated into.
"""
from __future__ import annotations

import argparse
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mura_jax.models.densenet import ARCHS, create_model, variable_shapes

COLUMNS = ('arch', 'image', 'batch', 'dtype', 'in ch', 'remat', 'fwd compile s', 'fwd img/s',
           'train compile s', 'train img/s', 'device')


def random_variables(model, in_channels: int, seed: int = 0) -> dict:
  """Variables of the right shapes; random kernels avoid all-zero fast paths."""
  rs = np.random.RandomState(seed)

  def leaf(path, shape):
    if path[-1].key == 'kernel':
      std = math.sqrt(2 / math.prod(shape.shape[:-1]))
      return rs.normal(0, std, shape.shape).astype(np.float32)
    return np.full(shape.shape, 1.0 if path[-1].key in ('scale', 'var') else 0.0, np.float32)

  return jax.tree_util.tree_map_with_path(leaf, variable_shapes(model, in_channels))


def make_train_step(model, optimizer):
  def loss_fn(params, batch_stats, images, labels):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
    loss = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels).mean()
    return loss, updates['batch_stats']

  def train_step(params, batch_stats, opt_state, images, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return train_step


def compile_and_time(fn, args, steps: int, donate_argnums=()) -> tuple[float, float]:
  """(compile seconds, seconds per call); donated state is threaded from call to call."""
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  compile_s = time.perf_counter() - start
  out = compiled(*args)  # warm-up
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    if donate_argnums:  # the next step's state is this step's output
      args = (*out[:len(donate_argnums)], *args[len(donate_argnums):])
    out = compiled(*args)
  jax.block_until_ready(out)
  return compile_s, (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='densenet169', choices=sorted(ARCHS))
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--batch-size', type=int, default=8)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--in-channels', type=int, default=3, choices=(1, 3))
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--skip-train', action='store_true', help='forward pass only')
  parser.add_argument('--header', action='store_true', help='print the table header first')
  args = parser.parse_args()

  model = create_model(args.arch, num_classes=1, dtype=jnp.dtype(args.dtype), remat=args.remat)
  variables = jax.device_put(random_variables(model, args.in_channels))
  rs = np.random.RandomState(1)
  images = jax.device_put(rs.randn(args.batch_size, args.image_size, args.image_size,
                                   args.in_channels).astype(np.float32))
  labels = jax.device_put(rs.randint(0, 2, args.batch_size).astype(np.float32))

  forward = functools.partial(model.apply, train=False)
  fwd_compile, fwd_step = compile_and_time(forward, (variables, images), args.steps)
  train = ('-', '-')
  if not args.skip_train:
    optimizer = optax.adam(1e-4)
    state = (variables['params'], variables['batch_stats'], optimizer.init(variables['params']))
    train_compile, train_step = compile_and_time(
        make_train_step(model, optimizer), (*state, images, labels), args.steps,
        donate_argnums=(0, 1, 2))
    train = (f'{train_compile:.1f}', f'{args.batch_size / train_step:.2f}')

  device = jax.devices()[0]
  row = (args.arch, args.image_size, args.batch_size, args.dtype, args.in_channels,
         'yes' if args.remat else 'no', f'{fwd_compile:.1f}', f'{args.batch_size / fwd_step:.2f}',
         *train, f'{device.platform}: {device.device_kind} x{jax.device_count()}')
  if args.header:
    print('| ' + ' | '.join(COLUMNS) + ' |')
    print('|' + '---|' * len(COLUMNS))
  print('| ' + ' | '.join(map(str, row)) + ' |')


if __name__ == '__main__':
  main()
