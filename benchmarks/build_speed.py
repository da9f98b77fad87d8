"""Synthetic MURA generation and `mura` TFDS build throughput (images/s) on this machine.

    python benchmarks/build_speed.py [--studies-per-part 230] [--workers N] [--out /tmp/mura_bench]

Writes a synthetic MURA-v1.1 of about 6,000 images, builds it (array_record), and prints a
markdown row for BENCHMARKS.md.
"""

import argparse
import os
import platform
import shutil
import time

from mura_jax.data import synthetic
from tfds_mura import build


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--studies-per-part', type=int, default=230)
  parser.add_argument('--workers', type=int, default=os.cpu_count())
  parser.add_argument('--out', default='/tmp/mura_bench')
  parser.add_argument('--file_format', default='array_record')
  args = parser.parse_args()
  shutil.rmtree(args.out, ignore_errors=True)
  summary = synthetic.make_synthetic_mura(f'{args.out}/manual', args.studies_per_part, seed=0,
                                          num_workers=args.workers, progress=False)
  images = sum(summary['images'].values())
  start = time.time()
  build.build(f'{args.out}/manual', f'{args.out}/data', args.file_format, args.workers)
  seconds = time.time() - start
  print(f'| {platform.processor() or platform.machine()}, {os.cpu_count()} cores | {args.workers} | '
        f'{images:,} | synthetic: {summary["seconds"]:.1f} s ({summary["images_per_second"]:.0f} img/s) '
        f'| build ({args.file_format}): {seconds:.1f} s ({images / seconds:.0f} img/s) |')


if __name__ == '__main__':
  main()
