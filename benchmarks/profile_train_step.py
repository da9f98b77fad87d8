"""Where mura-jax's real train step spends its time on this machine: jax.profiler trace of a few
steps, the XLA ops' time summed by kind (convolution, dot, fusion kinds, copies, ...).

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python benchmarks/profile_train_step.py \
        [--batch 8] [--steps 3] [--top 25]
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_torch  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='densenet169')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--hlo', default='', help='write the compiled HLO text here')
  parser.add_argument('--model-options', default='{}', help='config.model overrides, JSON')
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top  (after start_jax_process)
  setup = vs_torch.jax_setup(dict(arch=args.arch, image_size=224, batch=args.batch,
                                  dtype='float32', model_options=json.loads(args.model_options)))
  state, batch = setup.state, setup.batch
  t = time.perf_counter()
  compiled = setup.steps.train.lower(state, batch).compile()
  print(f'compile {time.perf_counter() - t:.1f} s')
  if args.hlo:
    with open(args.hlo, 'w') as f:
      f.write(compiled.as_text())
  state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  logdir = tempfile.mkdtemp()
  t = time.perf_counter()
  with jax.profiler.trace(logdir):
    for _ in range(args.steps):
      state, m = compiled(state, batch)
    jax.block_until_ready(state)
  wall = (time.perf_counter() - t) / args.steps
  from jax._src.lib import _profile_data  # pylint: disable=g-import-not-at-top
  path = glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True)[0]
  data = _profile_data.ProfileData.from_file(path)
  by_name, by_kind = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        name = ev.name
        if not re.match(r'^(fusion|convolution|dot|copy|reduce|transpose|broadcast|concatenate|'
                        r'slice|pad|add|multiply|select|dynamic|custom-call|loop_|input_|wrapped_|'
                        r'reduce-window|select-and-scatter|bitcast|xnn|ynn|onednn)', name):
          continue
        by_name[name] += ev.duration_ns / 1e6 / args.steps
        kind = re.sub(r'[._]?\d+$', '', name)
        by_kind[kind] += ev.duration_ns / 1e6 / args.steps
  total = sum(by_kind.values())
  print(f'wall {1e3 * wall:.0f} ms per step; XLA ops traced {total:.0f} ms per step '
        f'(summed over threads); load {os.getloadavg()[0]:.2f}; XLA_FLAGS='
        f'{os.environ.get("XLA_FLAGS", "")!r}')
  print('| op kind | ms per step | share |\n|---|---:|---:|')
  for kind, ms in by_kind.most_common(args.top):
    print(f'| {kind} | {ms:.0f} | {ms / total:.0%} |')
  print('\nlargest single ops:')
  for name, ms in by_name.most_common(args.top):
    print(f'  {name}: {ms:.1f} ms')


if __name__ == '__main__':
  vs_torch.start_jax_process()  # as main.py starts
  main()
