"""Input pipeline and training throughput on this machine.

    python benchmarks/train_speed.py pipeline --data_dir DIR [--image_size 224] [--workers 0 1 2]
    python benchmarks/train_speed.py demo_steps --data_dir DIR [--steps 50]
    python benchmarks/train_speed.py densenet169 [--batch 8] [--dtype float32|bfloat16] [--steps 20]

`pipeline`: training views/s (decode, flip, rotation, resize; uint8 out) per configuration of grain
workers, and per CPU core. `demo_steps`: jitted train steps/s of configs/demo.py's model on one
device. `densenet169`: train steps/s of the paper's model at 224 (for a GPU, where one is at hand).
Prints markdown rows for BENCHMARKS.md.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

from mura_jax.data import input_pipeline
from mura_jax.runtime import parallel
from mura_jax.configs import base as common
from mura_jax.configs import demo
from mura_jax.training import state as train_state

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_torch  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def pipeline(args):
  source = input_pipeline.data_source(args.data_dir, 'train')
  for workers in args.workers:
    batches = input_pipeline.batches_of(input_pipeline.train_batches(
        source, seed=0, epoch=0, global_batch=32, image_size=args.image_size, num_workers=workers))
    next(batches)  # start-up (worker processes) is not throughput
    start, views = time.time(), 0
    for batch in batches:
      views += len(batch['label'])
      if views >= args.views:
        break
    rate = views / (time.time() - start)
    cores = max(workers, 1)
    print(f'| input pipeline, {args.image_size}px, flip + rotation | {workers} workers | '
          f'{rate:.0f} views/s | {rate / cores:.0f} views/s per core |')
    batches.close()


def _steps_per_second(config, steps, image_size):
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = train_state.network_of(config)
  loss_weights = np.full((7, 2), 0.5, np.float32)
  compiled = train_state.compile_steps(config, model, loss_weights, mesh)
  state = jax.device_put(train_state.initial_state(config, model), parallel.replicated(mesh))
  b = config.train.global_batch_size
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({'image': rng.integers(0, 256, (b, image_size, image_size, 1), dtype=np.uint8),
                                 'label': rng.integers(0, 2, b).astype(np.int32),
                                 'body_part': rng.integers(0, 7, b).astype(np.int32)}, mesh)
  start = time.time()
  state, metrics = compiled.train(state, batch)
  jax.block_until_ready(metrics['loss'])
  compile_seconds = time.time() - start
  start = time.time()
  for _ in range(steps):
    state, metrics = compiled.train(state, batch)
  jax.block_until_ready(metrics['loss'])
  rate = steps / (time.time() - start)
  return rate, compile_seconds


def demo_steps(args):
  config = demo.get_config()
  rate, compile_seconds = _steps_per_second(config, args.steps, config.data.image_size)
  print(f'| demo model train step, {config.data.image_size}px, batch {config.train.global_batch_size} | '
        f'{jax.devices()[0].device_kind} | {rate:.2f} steps/s ({rate * config.train.global_batch_size:.0f} '
        f'images/s) | first step (compile) {compile_seconds:.1f} s |')


def densenet169(args):
  config = common.base_config()
  config.model.dtype = args.dtype
  config.train.global_batch_size = args.batch
  rate, compile_seconds = _steps_per_second(config, args.steps, 224)
  print(f'| densenet169 train step, 224px, batch {args.batch}, {args.dtype} | {jax.devices()[0].device_kind} | '
        f'{rate:.2f} steps/s ({rate * args.batch:.0f} images/s) | first step (compile) {compile_seconds:.1f} s |')


def main():
  # What main.py's runs set up first (mimalloc, XLA:CPU's own convolutions): without them the
  # demo's step measured 68-71 img/s at 128 px, with them 126-139 (BENCHMARKS.md, "Training
  # steps").
  vs_torch.start_jax_process()
  parser = argparse.ArgumentParser()
  parser.add_argument('what', choices=['pipeline', 'demo_steps', 'densenet169'])
  parser.add_argument('--data_dir')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--views', type=int, default=1000)
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args()
  {'pipeline': pipeline, 'demo_steps': demo_steps, 'densenet169': densenet169}[args.what](args)


if __name__ == '__main__':
  main()
