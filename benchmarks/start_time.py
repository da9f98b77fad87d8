"""Cold vs warm start of `python -m mura_jax.main`: seconds from process start to the first
training step, without and with JAX's persistent compilation cache.

    python benchmarks/start_time.py --data_dir DIR [--config configs/densenet169.py] [--runs 2]
        [--init torchvision:FILE.pth]

DIR holds a built `mura` dataset (e.g. the demo's WORKDIR/tfds). Each run starts a fresh process
on a fresh workdir, reads train.py's "First training step done" log line, and kills the process.
The first run uses an empty cache folder (cold); the next ones reuse it (warm): JAX's compiled
executables and mura-jax's traced steps (mura_jax/runtime/step_cache.py).

--init: the paper's start is ImageNet weights (configs/densenet169.py reads torchvision's file);
a file of the same format, random weights, for this measurement:
    python -c "import torch, torchvision; torch.save(torchvision.models.densenet169().state_dict(),
               '/tmp/densenet169.pth')"
The default, random, runs Flax's initialisation instead.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

LINE = re.compile(r'First training step done ([\d.]+) s after training started, ([\d.]+) s after '
                  r'the process started')


def first_step(config, data_dir, cache_dir, workdir, init, extra) -> tuple[float, float, float]:
  command = [sys.executable, '-m', 'mura_jax.main', '--config', config, '--workdir', workdir,
             f'--config.data.data_dir={data_dir}', '--config.data.synthetic=False',
             f'--config.model.init={init}', f'--config.compilation_cache_dir={cache_dir}', *extra]
  start = time.time()
  # Its own process group: the kill below takes grain's worker processes with it.
  process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             text=True, start_new_session=True)
  try:
    for line in process.stderr:
      match = LINE.search(line)
      if match:
        return float(match[2]), float(match[1]), time.time() - start
    raise RuntimeError(f'no first step: exit {process.wait()}')
  finally:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--config', default='configs/densenet169.py')
  parser.add_argument('--runs', type=int, default=2)
  parser.add_argument('--init', default='random', help="config.model.init: 'random' or "
                      "'torchvision:FILE.pth' (see above)")
  parser.add_argument('extra', nargs='*', help='more --config.* flags')
  args = parser.parse_args()
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    cache = os.path.join(tmp, 'cache')
    print('| run | cache | process start -> first step (s) | train start -> first step (s) |')
    print('|---|---|---:|---:|')
    for run in range(args.runs):
      age, in_train, _ = first_step(args.config, args.data_dir, cache,
                                    os.path.join(tmp, f'work{run}'), args.init, args.extra)
      print(f'| {run + 1} | {"cold (empty)" if run == 0 else "warm"} | {age:.1f} | '
            f'{in_train:.1f} |', flush=True)
    print(f'init {args.init}; load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}')


if __name__ == '__main__':
  main()
