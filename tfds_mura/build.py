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

from absl import logging

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


def build(manual_dir: str | None, data_dir: str, file_format: str = 'array_record',
          num_workers: int | None = None):
  """Builds `mura` in data_dir from manual_dir; returns the builder. A dataset already built
  there is reused only when manual_dir holds the same MURA (`check_reuse`), or none is given."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = mura.Builder(data_dir=data_dir, file_format=file_format, num_workers=num_workers)
  if builder.is_prepared():
    check_reuse(builder, manual_dir, data_dir)
    return builder
  if not manual_dir:
    raise mura.MuraDataError(f'{data_dir} holds no built mura dataset, and no manual_dir was '
                             f'given to build one.\n{mura.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def check_reuse(builder, manual_dir: str | None, data_dir: str) -> None:
  """A built dataset is reused, with a line that says so, when no manual_dir is given or it holds
  the MURA it was built from (the same four CSVs); anything else is an error, not a silent
  reuse of other data."""
  built = builder.info.metadata.get('source') if builder.info.metadata else None
  where = builder.data_dir
  origin = (f"from {built['read']} on {built['built']}" if built else 'by an earlier version '
            'that recorded no source')
  if not manual_dir:
    logging.warning('Using the mura dataset already built in %s (%s).', where, origin)
    return
  try:
    source = mura.Source(manual_dir)
  except mura.MuraDataError:
    raise mura.MuraDataError(
        f'{where} already holds a built mura dataset ({origin}), and the manual_dir {manual_dir} '
        'has no MURA-v1.1 to compare it with. To use the built dataset, give no manual_dir '
        f'(python -m tfds_mura.build --data_dir {data_dir}); to build again, '
        f'put MURA-v1.1.zip or MURA-v1.1/ in the manual_dir and delete {where}.') from None
  if built is None:
    raise mura.MuraDataError(
        f'{where} holds a mura dataset built by an earlier version, which did not record its '
        f'source: whether it is the MURA in {manual_dir} cannot be checked. Delete {where} to '
        'build again, or give no manual_dir to use it as it is.')
  if built['csv_sha256'] != source.fingerprint():
    raise mura.MuraDataError(
        f'{where} already holds a mura dataset built {origin}, but the manual_dir {manual_dir} '
        f'holds another MURA (its CSVs differ). Delete {where} to build from {manual_dir}, or '
        'pass another --data_dir.')
  logging.warning('Using the mura dataset already built in %s (%s; the same CSVs as in %s).',
                  where, origin, manual_dir)


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m tfds_mura.build', description=__doc__.split('\n')[0])
  parser.add_argument('--manual_dir', default=None,
                      help='folder holding MURA-v1.1.zip or the extracted MURA-v1.1/ (without: '
                           'show the dataset already built in --data_dir)')
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
