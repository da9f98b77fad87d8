"""Builds the `mura` TFDS dataset from a manual download, with progress bars and a summary.

    python -m tfds_mura.build --manual_dir DIR --data_dir DIR [--file_format array_record|tfrecord]

`manual_dir` holds `MURA-v1.1.zip` or the extracted `MURA-v1.1/`. Images are checked and encoded on
all cores. The data_dir is locked while it is built (`.mura-lock`, naming the build): a second
build into it is refused. A dataset already built there is reused only from the same CSVs and
image files (sizes and times, or the zip's CRC-32s, recorded at build time).
(TFDS 4.9.10's own `tfds build` CLI imports apache_beam, which this project does not need; with
it installed, `tfds build mura --imports tfds_mura --manual_dir DIR --data_dir DIR --file_format
array_record` is the equivalent.)
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import tempfile
import time

from tfds_mura import folder_lock
from tfds_mura.mura import mura_dataset_builder as mura
from etils import epath


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


def build(manual_dir: str | None, data_dir: str, file_format: str | None = None,
          num_workers: int | None = None):
  """Builds `mura` in data_dir from manual_dir; returns the builder. A dataset already built
  there is reused only when manual_dir holds the same MURA (`Builder.check_reuse`), or none is
  given; file_format (default array_record) must then be the one it was built in. A build holds
  the data_dir's lock (`folder_lock`): a second build into it is refused, naming the first."""
  built = _built(manual_dir, data_dir, file_format, num_workers)
  if built is not None:
    return built  # reading only: no lock, so that a read-only data_dir can be used
  if not manual_dir:
    raise mura.MuraDataError(f'{data_dir} holds no built mura dataset{misplaced_hint(data_dir)}'
                             f'{_being_built(data_dir)}, and no manual_dir was given to build '
                             f'one.\n{mura.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
  try:
    lock = folder_lock.acquire(data_dir, 'dataset build', error=mura.MuraDataError)
  except OSError as e:
    raise _cannot_write(e, data_dir) from None
  try:
    # A build that ended while we took the lock: look again, with a fresh builder.
    built = _built(manual_dir, data_dir, file_format, num_workers)
    return built if built is not None else _prepare(manual_dir, data_dir, file_format, num_workers)
  finally:
    folder_lock.release(lock)


def _built(manual_dir, data_dir, file_format, num_workers):
  """The builder of the dataset built in data_dir when it may be used (checked against
  manual_dir); None when none is built."""
  builder = mura.Builder(data_dir=data_dir, num_workers=num_workers)
  if not builder.is_prepared():
    return None
  built = builder.info.file_format.value
  if file_format and file_format != built:
    raise mura.MuraDataError(
        f'{builder.data_dir} already holds mura built as {built}, not {file_format}: give no '
        f'--file_format (or {built}) to use it, or delete {builder.data_dir} (or pass another '
        f'--data_dir) to build it as {file_format}.')
  builder.check_reuse(manual_dir)
  return builder


def _prepare(manual_dir, data_dir, file_format, num_workers):
  if '://' in os.fspath(data_dir):
    return _prepare_then_upload(manual_dir, data_dir, file_format, num_workers)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = mura.Builder(data_dir=data_dir, num_workers=num_workers)
  if file_format:
    builder.info.set_file_format(file_format, override=True)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except OSError as e:
    raise _cannot_write(e, data_dir) from None
  return builder


def _prepare_then_upload(manual_dir, data_dir, file_format, num_workers):
  """Builds into a local temporary folder (under TMPDIR), then copies mura/<version>/ into the
  remote data_dir (gs://...). ArrayRecord's writer opens local files only (riegeli's file
  descriptor writer: 'open() failed ... gs://...'), though its reader reads gs:// itself.
  dataset_info.json goes up last, so that a copy cut short is not taken for a built dataset."""
  with tempfile.TemporaryDirectory(prefix='mura-build-') as local:
    built = _prepare(manual_dir, local, file_format, num_workers)
    source = epath.Path(built.data_path)
    target = epath.Path(data_dir) / source.relative_to(local)
    files = sorted(source.iterdir(), key=lambda f: f.name == 'dataset_info.json')
    try:
      target.mkdir(parents=True, exist_ok=True)
      for f in files:
        with f.open('rb') as src, (target / f.name).open('wb') as dst:
          shutil.copyfileobj(src, dst, 64 << 20)
    except OSError as e:
      raise mura.MuraDataError(
          f'The dataset was built, but copying it into {target} failed ({type(e).__name__}: '
          f'{e}): check that the bucket exists and that this machine may write to it, then '
          'build again.') from None
  uploaded = mura.Builder(data_dir=data_dir, num_workers=num_workers)
  uploaded.build_warnings = built.build_warnings
  return uploaded


def _cannot_write(e: OSError, data_dir: str) -> OSError | mura.MuraDataError:
  """The error to raise for `e`: ours when it is about writing into data_dir (or a full disk)."""
  if e.errno != errno.ENOSPC and not _under(e.filename, data_dir):
    return e
  return mura.MuraDataError(
      f'The dataset cannot be written into the data_dir {data_dir} ({type(e).__name__}: '
      f'{e.strerror}{f": {e.filename}" if e.filename else ""}): give a --data_dir that is a '
      'folder you can write to, with room for the dataset.')


def _being_built(data_dir: str) -> str:
  """' (a dataset build into it is under way: pid ...; wait for it)' when a live build holds
  data_dir's lock; '' otherwise."""
  try:
    record = json.loads((epath.Path(data_dir) / folder_lock.LOCK_NAME).read_text())
  except (OSError, ValueError):
    return ''
  if not isinstance(record, dict) or folder_lock.holder_is_gone(record):
    return ''
  return f' (a dataset build into it is under way: {folder_lock.describe(record)}; wait for it)'


def _under(path, folder: str) -> bool:
  if not path:
    return False
  path, folder = os.path.abspath(os.fspath(path)), os.path.abspath(os.path.expanduser(folder))
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def data_dir_of_built(path_given: str) -> tuple[str, str] | None:
  """(which folder it is, the data_dir meant) when `path_given` is a built dataset's own mura/ or
  mura/<version>/ folder rather than the data_dir holding it; None otherwise."""
  path, version = epath.Path(path_given).expanduser(), str(mura.Builder.VERSION)
  if path.name == 'mura' and (path / version / 'dataset_info.json').exists():
    return 'mura/', str(path.parent)
  if (path.name == version and path.parent.name == 'mura' and
      (path / 'dataset_info.json').exists()):
    return f'mura/{version}/', str(path.parent.parent)
  return None


def misplaced_hint(data_dir: str) -> str:
  """' (...: give --data_dir X)' when data_dir is a built dataset's own folder, not its data_dir."""
  found = data_dir_of_built(data_dir)
  if found is None:
    return ''
  folder, meant = found
  return f' ({data_dir} is the {folder} folder of a built dataset: give --data_dir {meant})'


def _positive(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not a whole number of processes >= 1')
  return value


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m tfds_mura.build', description=__doc__.split('\n')[0])
  parser.add_argument('--manual_dir', default=None,
                      help='folder holding MURA-v1.1.zip or the extracted MURA-v1.1/ (without: '
                           'show the dataset already built in --data_dir)')
  parser.add_argument('--data_dir', required=True, help='TFDS data_dir to write mura/1.1.0/ into')
  parser.add_argument('--file_format', default=None, choices=['array_record', 'tfrecord'],
                      help='array_record (the default for a new build; grain, tfds.data_source; no '
                           'TensorFlow) or tfrecord (tfds.load; needs TensorFlow)')
  parser.add_argument('--num_workers', type=_positive, default=None,
                      help='processes (default: all cores)')
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
  if builder.build_warnings:  # logged as they came, among the progress bars: once more here
    sys.stdout.flush()
    print('\n' + '\n'.join(f'warning: {w}' for w in builder.build_warnings), file=sys.stderr)


if __name__ == '__main__':
  main()
