"""Builds the `mura` TFDS dataset from a manual download, with progress bars and a summary.

    python -m tfds_mura.build --manual_dir DIR --data_dir DIR [--file_format array_record|tfrecord]

`manual_dir` holds `MURA-v1.1.zip` or the extracted `MURA-v1.1/`. Images are checked and encoded on
all cores. (TFDS 4.9.10's own `tfds build` CLI imports apache_beam, which this project does not
need; with it installed, `tfds build mura --imports tfds_mura --manual_dir DIR --data_dir DIR
--file_format array_record` is the equivalent.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tfds_mura.mura import mura_dataset_builder as mura


def summary_table(info) -> str:
  """Images (normal/abnormal) and studies per split and body part, as a plain-text table."""
  images, studies = info.metadata['image_counts'], info.metadata['study_counts']
  lines = []
  for split in images:
    lines.append(f'{split:<10} {"images normal":>14} {"abnormal":>9} {"studies normal":>15} {"abnormal":>9}')
    total = [0, 0, 0, 0]
    for part in mura.BODY_PARTS:
      row = [images[split][part]['normal'], images[split][part]['abnormal'],
             studies[split][part]['normal'], studies[split][part]['abnormal']]
      total = [t + r for t, r in zip(total, row)]
      lines.append(f'  {part:<8} {row[0]:>14,} {row[1]:>9,} {row[2]:>15,} {row[3]:>9,}')
    lines.append(f'  {"total":<8} {total[0]:>14,} {total[1]:>9,} {total[2]:>15,} {total[3]:>9,}')
  return '\n'.join(lines)


def build(manual_dir: str, data_dir: str, file_format: str = 'array_record',
          num_workers: int | None = None):
  """Builds (or finds already built) `mura` in data_dir; returns the builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = mura.Builder(data_dir=data_dir, file_format=file_format, num_workers=num_workers)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m tfds_mura.build', description=__doc__.split('\n')[0])
  parser.add_argument('--manual_dir', required=True,
                      help='folder holding MURA-v1.1.zip or the extracted MURA-v1.1/')
  parser.add_argument('--data_dir', required=True, help='TFDS data_dir to write mura/1.1.0/ into')
  parser.add_argument('--file_format', default='array_record', choices=['array_record', 'tfrecord'],
                      help='array_record (grain, tfds.data_source; no TensorFlow) or tfrecord '
                           '(tfds.load; needs TensorFlow)')
  parser.add_argument('--num_workers', type=int, default=None, help='processes (default: all cores)')
  args = parser.parse_args(argv)
  if args.file_format == 'tfrecord':
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      sys.exit('--file_format=tfrecord needs TensorFlow: pip install "mura-jax[tf]" '
               '(or use the default array_record, which needs none).')
  start = time.time()
  try:
    builder = build(args.manual_dir, args.data_dir, args.file_format, args.num_workers)
  except mura.MuraDataError as e:
    sys.exit(f'error: {e}')
  seconds = time.time() - start
  num_images = sum(s.num_examples for s in builder.info.splits.values())
  print(f'\nmura {builder.info.version} ({builder.info.file_format.value}) in {builder.data_dir}')
  print(summary_table(builder.info))
  print(f'{num_images:,} images in {seconds:.1f} s ({num_images / seconds:.0f} images/s, '
        f'{args.num_workers or os.cpu_count()} workers).')
  print(f"Load it with: tfds.data_source('mura', data_dir={args.data_dir!r})")


if __name__ == '__main__':
  main()
