"""Paired A/B of densenet169 train-step variants in one process, steps interleaved.

    python benchmarks/ab_train_step.py 'scanned={}' 'unrolled={"scan_segment": 0}' [--steps 40]

Each variant is `label=JSON` of config.model overrides (the first is the baseline); a key
"compiler_options" in it holds XLA options for that variant's compilation instead, e.g.
'fast={"compiler_options": {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME"}}'. All are
compiled first, then timed one step at a time in turn (A, B, A, B, ...), so that the drift of
this shared VM (20% over minutes, measured) hits every variant alike. The table gives each
variant's median and mean throughput and the median over pairs of its step time divided by the
baseline's step time in the same turn: below 1 is faster. XLA_FLAGS apply to every variant (they
are read once per process); compiler_options take one value per option (a repeated one such as
xla_cpu_experimental_ynn_fusion_type is replaced, not added to).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_torch  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def parse_variant(text: str) -> tuple[str, dict]:
  label, sep, options = text.partition('=')
  if not sep or not label:
    raise SystemExit(f'{text!r}: give a variant as label=JSON, for example '
                     '\'unrolled={"scan_segment": 0}\'.')
  try:
    return label, json.loads(options or '{}')
  except json.JSONDecodeError as e:
    raise SystemExit(f'{text!r}: the model options are not JSON ({e}).') from None


def check_compiler_options(label: str, compiler_options: dict | None):
  """Fails before the first long compile on an option this jaxlib does not take (it accepts
  only a subset of the xla_cpu_* names its XLA_FLAGS know)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  try:
    jax.jit(jnp.negative).lower(jnp.zeros(4)).compile(compiler_options)
  except jax.errors.JaxRuntimeError as e:
    raise SystemExit(f'{label}: {e}') from None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('variants', nargs='+', help='label=JSON of config.model overrides')
  parser.add_argument('--arch', default='densenet169')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=40, help='timed steps per variant')
  parser.add_argument('--warmup', type=int, default=16,
                      help='untimed turns first: on a 2-core VM 1 process in 4 takes up to 16 '
                      'train steps to settle its memory (BENCHMARKS.md)')
  args = parser.parse_args()
  variants = [parse_variant(v) for v in args.variants]
  import jax  # pylint: disable=g-import-not-at-top  (after start_jax_process)
  for label, options in variants:
    check_compiler_options(label, options.get('compiler_options'))
  runs = []
  for label, options in variants:
    compiler_options = options.pop('compiler_options', None)
    setup = vs_torch.jax_setup(dict(arch=args.arch, image_size=224, batch=args.batch,
                                    dtype='float32', model_options=options), traced_cache=None)
    batch = setup.batch
    t = time.perf_counter()
    compiled = setup.steps.train.lower(setup.state, batch).compile(compiler_options)
    compile_s = time.perf_counter() - t
    state, _ = compiled(setup.state, batch)  # warm-up
    jax.block_until_ready(state)
    runs.append(dict(label=label, step=compiled, state=state, compile_s=compile_s, times=[]))
    print(f'{label}: compiled in {compile_s:.1f} s', flush=True)
  for turn in range(args.warmup + args.steps):
    for run in runs:
      t = time.perf_counter()
      run['state'], _ = run['step'](run['state'], batch)
      jax.block_until_ready(run['state'])
      if turn >= args.warmup:
        run['times'].append(time.perf_counter() - t)
  base = runs[0]['times']
  print(f'\n{args.arch}, batch {args.batch}, {args.steps} interleaved steps each after '
        f'{args.warmup} untimed; load '
        f'{os.getloadavg()[0]:.2f}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print(f'| variant | median img/s | mean img/s | step time / {runs[0]["label"]}\'s (median of '
        'pairs) | compile s |\n|---|---:|---:|---:|---:|')
  for run in runs:
    ts = run['times']
    ratio = statistics.median(a / b for a, b in zip(ts, base))
    print(f'| {run["label"]} | {args.batch / statistics.median(ts):.2f} | '
          f'{args.batch * len(ts) / sum(ts):.2f} | {ratio:.3f} | {run["compile_s"]:.1f} |')


if __name__ == '__main__':
  vs_torch.start_jax_process()  # as main.py starts
  main()
