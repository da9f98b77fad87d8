"""Every bad input of the dataset builder (`python -m tfds_mura.build`, and the data step of
`python -m mura_jax.main`) and the message it must print. (The CSV checks themselves, rows and
files, are in test_tfds_mura.py; this file adds what comes in one run and what is never silent.)

    input                                         message (start)
    MURA-v1.1.zip truncated, or not a zip         F (N bytes) is not a readable zip (...): a
                                                    truncated or damaged download? ...
    CSV problems and bad images, both splits      The build stopped and wrote nothing: K in the
                                                    CSVs and their files and M corrupt, ...
    a malformed CSV row and other problems        the same one error, the row listed with the rest
    CRLF line ends in a CSV                       warning: F has CRLF (Windows) line ends ...
    a transparent RGBA view, a colour photograph  warning: N image(s) were not plain radiographs;
                                                    ... composited onto black / colour image ...
    a data_dir that holds a build, empty manual   D already holds a built mura dataset (...), and
      dir                                           the manual_dir M has no MURA-v1.1 ...
    a data_dir built from other CSVs              D already holds a mura dataset built from ...,
                                                    but the manual_dir M holds another MURA
      (tfds.builder('mura').download_and_prepare   the same error)
    the same data_dir and manual_dir again        warning: Using the mura dataset already built
                                                    in D (...): compared with M, the same four
                                                    CSVs and the size and modification time ...
    image files changed under the same CSVs       D was built from M on T from the same CSVs as
      (a folder, or members of the zip)             in M, but K of the N image files they list
                                                    changed since: (the first 5, a count) ...
                                                    delete D/.. (the mura/ folder of the data_dir)
    a build made before image files were          warning: Using ... Only its four CSVs could be
      recorded                                      compared with those in M (the same): ...
    a data_dir another build is writing           D is in use by another dataset build: pid P on
                                                    host H, started T (command). One folder ...
    a lock left by a build that was killed        note: D was locked by a dataset build that is
                                                    gone (pid P ...); taking it over.
    the demo's synthetic MURA written by another  M is in use by another synthetic MURA write:
      run, or left half-written                     pid P ... / M/MURA-v1.1 holds an incomplete
                                                    MURA-v1.1 without its CSVs ...
    a manual_dir that does not exist              The manual_dir M does not exist: create it ...
    a manual_dir that is a file (often the zip)   The manual_dir M is a file, not a folder: give
                                                    the folder that holds ... (--manual_dir P)
    MURA-v1.1/ extracted one level too deep,      Neither MURA-v1.1/ (with its CSVs) nor
      a file named MURA-v1.1, a renamed zip or      MURA-v1.1.zip is in the manual_dir M (it holds:
      folder                                        [...]): <what it looks like and the fix>
    a zip without MURA-v1.1/ at its top           Z:MURA-v1.1/train_labeled_studies.csv is missing
                                                    (Z holds [...], not MURA-v1.1/: ...)
    a CSV damaged in the zip, a folder, UTF-16    F cannot be read (...) / F is UTF-16 text /
      or binary                                     F is not text (...): ... (in the one error)
    an empty CSV                                  N has no rows (0 bytes): an empty or cut-short
                                                    copy? (in the one error)
    CSV paths without the MURA-v1.1/ prefix       N line K: 'train/...' is not a MURA-v1.1/train/
                                                    ... path (each row, none taken for a header)
    blank lines and a header row in a CSV         read; warning: F: line 1 looks like a header row
    a data_dir that cannot be written             The dataset cannot be written into the data_dir
                                                    D (NotADirectoryError / PermissionError: ...)
    --file_format other than the built one        D already holds mura built as array_record, not
                                                    tfrecord: ...
    --data_dir pointing at mura/ or mura/1.1.0/   D holds no built mura dataset (D is the mura/
                                                    folder of a built dataset: give --data_dir P)
    --num_workers 0                               argument --num_workers: '0' is not a whole
                                                    number of processes >= 1
"""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tfds_mura import build
from tfds_mura import folder_lock
from tfds_mura.mura import mura_dataset_builder as mura
import tfds_mura


def _build(manual_dir, data_dir, **kw):
  return build.build(manual_dir and str(manual_dir), str(data_dir), num_workers=1, **kw)


def _error(manual_dir, data_dir, **kw) -> str:
  with pytest.raises(tfds_mura.MuraDataError) as e:
    _build(manual_dir, data_dir, **kw)
  return str(e.value)


def _zip(tree, zip_path, stored=False):
  """tree's files (MURA-v1.1/...) as a zip; `stored` keeps them uncompressed (to damage one)."""
  files = sorted(p for p in tree.rglob('*') if p != zip_path)  # listed before the zip exists
  zip_path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(zip_path, 'w', zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as z:
    for path in files:
      z.write(path, path.relative_to(tree))
  return zip_path


def _lines(tree, name):
  return (tree / 'MURA-v1.1' / name).read_text().splitlines()


@pytest.mark.parametrize('damage', ['truncated', 'not a zip'])
def test_damaged_zip_is_named_with_what_to_do(tmp_path, damage):
  manual = tmp_path / 'manual'
  manual.mkdir()
  data = b'PK\x03\x04' + b'\x00' * 100 if damage == 'truncated' else b'<html>login page</html>'
  (manual / 'MURA-v1.1.zip').write_bytes(data)
  with pytest.raises(tfds_mura.MuraDataError) as e:
    _build(manual, tmp_path / 'data')
  message = str(e.value)
  assert f'{manual / "MURA-v1.1.zip"} ({len(data):,} bytes) is not a readable zip' in message
  assert 'Download it again' in message and 'BadZipFile' in message


def test_csv_and_image_problems_of_both_splits_in_one_error(tree, tmp_path):
  train = _lines(tree, 'train_image_paths.csv')
  valid = _lines(tree, 'valid_image_paths.csv')
  (tree / valid[0]).unlink()                                    # a CSV problem, validation
  (tree / train[1]).write_bytes(b'\x89PNG\r\n\x1a\n' + b'x' * 50)  # a bad image, train
  bad_valid = tree / valid[-1]
  bad_valid.write_bytes(bad_valid.read_bytes()[:200])            # a bad image, validation
  with pytest.raises(tfds_mura.MuraDataError) as e:
    _build(tree, tmp_path / 'data')
  message = str(e.value)
  assert message.startswith('The build stopped and wrote nothing: 1 in the CSVs and their files '
                            'and 2 corrupt, truncated or unsupported image(s)')
  assert valid[0] in message and str(tree / train[1]) in message and str(bad_valid) in message
  assert not (tmp_path / 'data' / 'mura' / '1.1.0' / 'dataset_info.json').exists()


def test_bad_images_of_both_splits_in_one_error(tree, tmp_path):
  train = _lines(tree, 'train_image_paths.csv')
  valid = _lines(tree, 'valid_image_paths.csv')
  for path in (tree / train[0], tree / valid[0]):
    path.write_bytes(b'not a png')
  with pytest.raises(tfds_mura.MuraDataError, match=r'2 corrupt, truncated .*\(2\)') as e:
    _build(tree, tmp_path / 'data')
  assert str(tree / train[0]) in str(e.value) and str(tree / valid[0]) in str(e.value)
  assert not (tmp_path / 'data' / 'mura' / '1.1.0' / 'dataset_info.json').exists()
  assert not (tmp_path / 'data' / folder_lock.LOCK_NAME).exists()  # a failed build: unlocked


def test_crlf_is_read_with_a_warning(tree, tmp_path, caplog):
  path = tree / 'MURA-v1.1' / 'valid_labeled_studies.csv'
  path.write_bytes(path.read_bytes().replace(b'\n', b'\r\n'))
  with caplog.at_level(logging.WARNING):
    _build(tree, tmp_path / 'data')
  assert f'{path} has CRLF (Windows) line ends' in caplog.text


def test_transparent_and_colour_views_are_converted_with_a_warning(tree, tmp_path, caplog):
  train = _lines(tree, 'train_image_paths.csv')
  gray = np.asarray(Image.open(tree / train[0]).convert('L'))
  rgba = np.stack([gray] * 3 + [np.full_like(gray, 255)], -1)
  rgba[: gray.shape[0] // 2, :, 3] = 0  # the top half transparent
  Image.fromarray(rgba, 'RGBA').save(tree / train[0])
  colour = np.stack([gray, gray // 2, np.zeros_like(gray)], -1)
  Image.fromarray(colour, 'RGB').save(tree / train[1])
  with caplog.at_level(logging.WARNING):
    builder = _build(tree, tmp_path / 'data')
  assert '2 image(s) were not plain radiographs' in caplog.text
  assert f'{tree / train[0]}: 50.0% of the pixels are transparent: composited onto black' in (
      caplog.text)
  assert f'{tree / train[1]}: colour image' in caplog.text
  assert builder.info.metadata['converted_images'] == 2
  source = tfds.data_source('mura', data_dir=tmp_path / 'data', split='train')
  stored = {source[i]['image_path']: source[i]['image'] for i in range(len(source))}
  hidden = stored[train[0].encode()][..., 0]
  assert (hidden[: gray.shape[0] // 2] == 0).all()  # what was transparent stays hidden (black)
  np.testing.assert_array_equal(hidden[gray.shape[0] // 2:], gray[gray.shape[0] // 2:])


def test_an_existing_build_is_never_reused_silently(tree, tmp_path, caplog):
  data = tmp_path / 'data'
  _build(tree, data)
  where = data / 'mura' / '1.1.0'
  # The same MURA again: reused, and said so.
  with caplog.at_level(logging.WARNING):
    _build(tree, data)
  assert f'Using the mura dataset already built in {where}' in caplog.text
  # An empty manual_dir: not a silent reuse.
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(tfds_mura.MuraDataError) as e:
    _build(empty, data)
  assert f'{where} already holds a built mura dataset' in str(e.value)
  assert f'the manual_dir {empty} has no MURA-v1.1' in str(e.value) and 'give no manual_dir' in (
      str(e.value))
  # Another MURA (other CSVs): an error naming both.
  other = tmp_path / 'other'
  shutil.copytree(tree, other)
  labels = other / 'MURA-v1.1' / 'valid_labeled_studies.csv'
  labels.write_text('\n'.join(labels.read_text().splitlines()[:-1]) + '\n')
  with pytest.raises(tfds_mura.MuraDataError, match=f'but the manual_dir {other} holds another '
                                                    'MURA'):
    _build(other, data)
  # No manual_dir: the built dataset, said so.
  assert _build(None, data).info.metadata['source']['csv_sha256'] == mura.Source(tree).fingerprint()


def _images(tree):
  return sorted(_lines(tree, 'train_image_paths.csv') + _lines(tree, 'valid_image_paths.csv'))


def test_image_files_changed_under_the_same_csvs_are_named(tree, tmp_path):
  data = tmp_path / 'data'
  _build(tree, data)
  where = data / 'mura' / '1.1.0'
  images = _images(tree)
  same_size = tree / images[0]  # other bytes, the same size, a new time
  flipped = bytearray(same_size.read_bytes())
  flipped[len(flipped) // 2] ^= 0xFF
  same_size.write_bytes(bytes(flipped))
  os.utime(same_size, ns=(0, same_size.stat().st_mtime_ns + 10**9))
  sizes = {}
  for path in images[1:7]:  # longer by a byte
    sizes[path] = (tree / path).stat().st_size
    with open(tree / path, 'ab') as f:
      f.write(b'\0')
  message = _error(tree, data)
  assert message.startswith(f'{where} was built from {tree} on ')
  assert (f'from the same CSVs as in {tree}, but 7 of the {len(images)} image files they list '
          'changed since:') in message
  assert f'{same_size} (other bytes, the same size, modified since)' in message
  for path in images[1:5]:
    assert f'{tree / path} ({sizes[path]:,} -> {sizes[path] + 1:,} bytes)' in message
  assert str(tree / images[5]) not in message and '... and 2 more' in message
  assert message.endswith(f'The built dataset holds their old pixels. To build from the files as '
                          f'they are now, delete {where.parent} (the mura/ folder of the '
                          'data_dir) to build again, or pass another --data_dir.')


def test_a_reuse_says_what_it_compared(tree, tmp_path):
  data = tmp_path / 'data'
  _build(tree, data)
  where, n = data / 'mura' / '1.1.0', len(_images(tree))
  said = _build(tree, data).build_warnings
  assert len(said) == 1 and said[0].startswith(f'Using the mura dataset already built in {where} '
                                               f'(from {tree} on ')
  assert said[0].endswith(f'): compared with {tree}, the same four CSVs and the size and '
                          f'modification time of each of the {n} images they list.')
  # A new time on the same bytes (a copy that did not keep times): read again, still reused.
  touched = tree / _images(tree)[3]
  os.utime(touched, ns=(0, touched.stat().st_mtime_ns + 10**9))
  assert _build(tree, data).build_warnings[0].endswith(
      f'of each of the {n} images they list (1 with a new time read again: the same bytes, by '
      'CRC-32).')
  # A build made before images were recorded: reused, saying that only the CSVs were compared.
  (where / mura.IMAGE_RECORD).unlink()
  said = _build(tree, data).build_warnings
  assert (f'Only its four CSVs could be compared with those in {tree} (the same): it was built '
          'before image sizes and times were recorded, so image files changed since are not '
          f'noticed; if they may have changed, delete {where.parent}') in said[0]


def test_a_zip_member_changed_under_the_same_csvs_is_named(tree, tmp_path):
  zipped = _zip(tree, tmp_path / 'zipped' / 'MURA-v1.1.zip')
  data = tmp_path / 'data'
  _build(zipped.parent, data)
  n = len(_images(tree))
  assert _build(zipped.parent, data).build_warnings[0].endswith(
      f"compared with {zipped}, the same four CSVs and the size and CRC-32 of each of the {n} "
      "images they list, from the zip's directory.")
  changed = tree / _images(tree)[-1]
  flipped = bytearray(changed.read_bytes())
  flipped[len(flipped) // 2] ^= 0xFF
  changed.write_bytes(bytes(flipped))
  zipped.unlink()
  _zip(tree, zipped)
  message = _error(zipped.parent, data)
  assert (f'but 1 of the {n} image files they list changed since:\n  {zipped}:'
          f'{_images(tree)[-1]} (other bytes, the same size)\n') in message


def test_a_data_dir_being_built_is_refused_naming_the_build(tree, tmp_path):
  data = tmp_path / 'data'
  data.mkdir()
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
  try:
    (data / folder_lock.LOCK_NAME).write_text(json.dumps({
        'pid': holder.pid, 'host': socket.gethostname(), 'started': time.time(),
        'started_text': '2026-05-01 09:00:00 UTC', 'command': 'python -m tfds_mura.build'}))
    message = _error(tree, data)
    assert message.startswith(
        f'{data} is in use by another dataset build: pid {holder.pid} on host '
        f'{socket.gethostname()}, started 2026-05-01 09:00:00 UTC (python -m tfds_mura.build). '
        'One folder holds one job at a time')
    assert not (data / 'mura').exists()
    # Without a manual_dir (show what is built): not only "nothing built", but who builds it.
    assert (f'{data} holds no built mura dataset (a dataset build into it is under way: pid '
            f'{holder.pid} on host') in _error(None, data)
  finally:
    holder.kill()
    holder.wait()


def test_a_lock_left_by_a_dead_build_is_taken_over_with_a_note(tree, tmp_path, capsys):
  data = tmp_path / 'data'
  data.mkdir()
  gone = int(subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                            capture_output=True, text=True, check=True).stdout)
  (data / folder_lock.LOCK_NAME).write_text(json.dumps({
      'pid': gone, 'host': socket.gethostname(), 'started': time.time(),
      'started_text': '2026-05-01 09:00:00 UTC'}))
  builder = _build(tree, data)
  assert builder.info.splits['train'].num_examples == len(_lines(tree, 'train_image_paths.csv'))
  assert (f'note: {data} was locked by a dataset build that is gone (pid {gone} on host '
          f'{socket.gethostname()}, started 2026-05-01 09:00:00 UTC); taking it over.'
          ) in capsys.readouterr().err
  assert not (data / folder_lock.LOCK_NAME).exists()


def test_the_demos_synthetic_mura_is_written_by_one_run_at_a_time(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mura_jax.data import dataset as data_lib  # pylint: disable=g-import-not-at-top
  from mura_jax.errors import DataError  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'data': {
      'synthetic_studies_per_part': 1, 'synthetic_valid_studies_per_part': 1,
      'synthetic_seed': 0}})
  manual = tmp_path / 'synthetic'
  manual.mkdir()
  writer = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
  try:
    (manual / folder_lock.LOCK_NAME).write_text(json.dumps({
        'pid': writer.pid, 'host': socket.gethostname(), 'started': time.time()}))
    with pytest.raises(DataError, match=f'{manual} is in use by another synthetic MURA write: '
                                        f'pid {writer.pid} on host'):
      data_lib.write_synthetic_mura(config, str(manual), 1)
  finally:
    writer.kill()
    writer.wait()
  # The writer died half-way (images, no CSVs): said so, not taken for a damaged download.
  (manual / 'MURA-v1.1' / 'train').mkdir(parents=True)
  with pytest.raises(DataError, match=f'{manual / "MURA-v1.1"} holds an incomplete MURA-v1.1 '
                                      'without its CSVs'):
    data_lib.write_synthetic_mura(config, str(manual), 1)
  assert not (manual / folder_lock.LOCK_NAME).exists()


def test_build_command_without_manual_dir_and_nothing_built(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'tfds_mura.build', '--data_dir', str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert f'error: {tmp_path} holds no built mura dataset, and no manual_dir' in out.stderr


def test_the_build_command_prints_its_warnings_after_the_summary(tree, tmp_path, capsys):
  path = tree / 'MURA-v1.1' / 'train_image_paths.csv'
  path.write_bytes(path.read_bytes().replace(b'\n', b'\r\n'))
  data = tmp_path / 'data'
  build.main(['--manual_dir', str(tree), '--data_dir', str(data), '--num_workers', '1'])
  err = capsys.readouterr().err
  assert f'warning: {path} has CRLF (Windows) line ends, not the official LF: read correctly' in err
  build.main(['--data_dir', str(data)])
  err = capsys.readouterr().err
  assert f'warning: Using the mura dataset already built in {data / "mura" / "1.1.0"}' in err


# ------------------------------------------------------------------------------------------------
# Bad inputs beyond the list: each one sentence naming the path and the fix.


def test_a_manual_dir_that_does_not_exist(tmp_path):
  message = _error(tmp_path / 'nowhere', tmp_path / 'data')
  assert message.startswith(f'The manual_dir {tmp_path / "nowhere"} does not exist: create it')
  assert mura.HOMEPAGE in message


@pytest.mark.parametrize('name', ['MURA-v1.1.zip', 'notes.txt'])
def test_a_manual_dir_that_is_a_file(tree, tmp_path, name):
  given = _zip(tree, tmp_path / 'downloads' / name)
  message = _error(given, tmp_path / 'data')
  assert message.startswith(f'The manual_dir {given} is a file, not a folder: give the folder that '
                            'holds MURA-v1.1.zip or MURA-v1.1/')
  assert f'(--manual_dir {given.parent}' in message
  assert ('renamed to MURA-v1.1.zip' in message) == (name != 'MURA-v1.1.zip')


def _manual_dir_with(tmp_path, tree, layout):
  manual = tmp_path / 'layout'
  if layout == 'one level too deep':
    shutil.copytree(tree / 'MURA-v1.1', manual / 'MURA-v1.1' / 'MURA-v1.1')
  elif layout == 'a file named MURA-v1.1':
    manual.mkdir()
    (manual / 'MURA-v1.1').write_text('x')
  elif layout == 'an incomplete extraction':
    shutil.copytree(tree / 'MURA-v1.1' / 'train', manual / 'MURA-v1.1' / 'train')
  elif layout == 'a renamed zip':
    _zip(tree, manual / 'MURA-v1.1 (1).zip')
  elif layout == 'a renamed folder':
    shutil.copytree(tree / 'MURA-v1.1', manual / 'mura')
    manual = manual / 'mura'
  elif layout == 'a folder inside MURA-v1.1':
    shutil.copytree(tree / 'MURA-v1.1', manual / 'MURA-v1.1')
    manual = manual / 'MURA-v1.1' / 'train'
  return manual


@pytest.mark.parametrize('layout, hint', [
    ('one level too deep', 'it was extracted one level too deep, use --manual_dir {m}/MURA-v1.1'),
    ('a file named MURA-v1.1', '{m}/MURA-v1.1 is a file, not the extracted folder'),
    ('an incomplete extraction', "{m}/MURA-v1.1/ lacks train_labeled_studies.csv (it holds: "
                                 "['train']), an incomplete extraction?"),
    ('a renamed zip', 'if MURA-v1.1 (1).zip is the MURA download (a browser may have renamed it), '
                      'rename it to MURA-v1.1.zip'),
    ('a renamed folder', 'it holds the CSVs itself, in a folder not named MURA-v1.1'),
    ('a folder inside MURA-v1.1', 'it is inside MURA-v1.1/, use --manual_dir {m}/../..'),
])
def test_a_manual_dir_without_mura_says_what_it_holds_instead(tree, tmp_path, layout, hint):
  manual = _manual_dir_with(tmp_path, tree, layout)
  message = _error(manual, tmp_path / 'data')
  assert message.startswith('Neither MURA-v1.1/ (with its CSVs) nor MURA-v1.1.zip is in the '
                            f'manual_dir {manual} (it holds: ')
  if hint.endswith('/../..'):
    hint = hint.replace('{m}/../..', str(manual.parent.parent))
  assert hint.format(m=manual) in message


def test_a_zip_without_mura_at_its_top(tree, tmp_path):
  wrapped = tmp_path / 'wrapped'
  shutil.copytree(tree, wrapped / 'download')
  zipped = _zip(wrapped, tmp_path / 'zipped' / 'MURA-v1.1.zip')
  message = _error(zipped.parent, tmp_path / 'data')
  assert (f"{zipped}:MURA-v1.1/train_labeled_studies.csv is missing ({zipped} holds ['download'], "
          'not MURA-v1.1/: is it the MURA download?)') in message


def test_a_csv_damaged_inside_the_zip(tree, tmp_path):
  zipped = _zip(tree, tmp_path / 'zipped' / 'MURA-v1.1.zip', stored=True)
  with zipfile.ZipFile(zipped) as z:
    info = z.getinfo('MURA-v1.1/valid_labeled_studies.csv')
  data = bytearray(zipped.read_bytes())
  data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 5] ^= 0xFF  # in the data
  zipped.write_bytes(bytes(data))
  message = _error(zipped.parent, tmp_path / 'data')
  assert (f'{zipped}:MURA-v1.1/valid_labeled_studies.csv cannot be read (BadZipFile: Bad CRC-32'
          in message and 'Download MURA-v1.1.zip again' in message)


@pytest.mark.parametrize('damage, expected', [
    ('a folder', '{f} cannot be read (IsADirectoryError'),
    ('UTF-16', '{f} is UTF-16 text, not the official plain ASCII'),
    ('binary', "{f} is not text (byte 0 is b'\\x89')"),
])
def test_an_unreadable_csv_is_one_problem_among_the_others(tree, tmp_path, damage, expected):
  path = tree / 'MURA-v1.1' / 'valid_labeled_studies.csv'
  if damage == 'a folder':
    path.unlink()
    path.mkdir()
  elif damage == 'UTF-16':
    path.write_bytes(path.read_text().encode('utf-16'))
  else:
    path.write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00')
  train = _lines(tree, 'train_image_paths.csv')
  (tree / train[0]).unlink()  # and a problem of the other split
  message = _error(tree, tmp_path / 'data')
  assert message.startswith('The build stopped and wrote nothing: 2 in the CSVs and their files')
  assert expected.format(f=path) in message and train[0] in message


def test_empty_csvs_are_problems_not_an_empty_split(tree, tmp_path):
  for name in ('valid_labeled_studies.csv', 'valid_image_paths.csv'):
    (tree / 'MURA-v1.1' / name).write_bytes(b'')
  message = _error(tree, tmp_path / 'data')
  assert 'valid: valid_labeled_studies.csv has no rows (0 bytes): an empty or cut-short copy?' in (
      message)
  assert 'valid: valid_image_paths.csv has no rows (0 bytes)' in message


def test_paths_without_the_mura_prefix_are_not_taken_for_headers(tree, tmp_path, caplog):
  path = tree / 'MURA-v1.1' / 'train_labeled_studies.csv'
  rows = _lines(tree, 'train_labeled_studies.csv')
  path.write_text(''.join(row.removeprefix('MURA-v1.1/') + '\n' for row in rows))
  with caplog.at_level(logging.WARNING):
    message = _error(tree, tmp_path / 'data')
  assert 'header' not in caplog.text
  for number, row in enumerate(rows, start=1):
    study = row.split(',')[0].removeprefix('MURA-v1.1/')
    assert f"train_labeled_studies.csv line {number}: '{study}' is not a MURA-v1.1/train/" in (
        message)


def test_blank_lines_and_a_header_row_are_read(tree, tmp_path, caplog):
  path = tree / 'MURA-v1.1' / 'valid_image_paths.csv'
  rows = _lines(tree, 'valid_image_paths.csv')
  path.write_text('\n'.join(['Path', rows[0], '', '  '] + rows[1:] + ['', '']))
  with caplog.at_level(logging.WARNING):
    builder = _build(tree, tmp_path / 'data')
  assert f"{path}: line 1 looks like a header row ('Path'), not a path; skipped it." in caplog.text
  assert builder.info.splits['validation'].num_examples == len(rows)


def test_a_malformed_row_comes_in_the_one_error_without_its_images(tree, tmp_path):
  labels = _lines(tree, 'train_labeled_studies.csv')
  study = labels[0].split(',')[0]
  (tree / 'MURA-v1.1' / 'train_labeled_studies.csv').write_text(
      '\n'.join([labels[0] + ',extra'] + labels[1:]) + '\n')
  valid = _lines(tree, 'valid_image_paths.csv')
  (tree / valid[0]).unlink()
  message = _error(tree, tmp_path / 'data')
  assert message.startswith('The build stopped and wrote nothing: 2 in the CSVs and their files')
  assert (f"train: train_labeled_studies.csv line 1: expected 2 comma-separated field(s), got "
          f"'{labels[0]},extra'") in message
  assert valid[0] in message and f'{study}image' not in message  # its views: not listed again


def test_a_data_dir_that_cannot_be_written(tree, tmp_path, monkeypatch):
  (tmp_path / 'afile').write_text('x')
  data = tmp_path / 'afile' / 'data'
  message = _error(tree, data)
  assert message.startswith(f'The dataset cannot be written into the data_dir {data} '
                            '(NotADirectoryError: Not a directory')
  assert 'give a --data_dir that is a folder you can write to' in message
  # A folder without write permission (simulated: the tests run as root, which ignores modes).
  locked = tmp_path / 'locked'
  makedirs = os.makedirs

  def refuse(path, *args, **kwargs):
    if os.fspath(path).startswith(os.fspath(locked)):
      raise PermissionError(13, 'Permission denied', os.fspath(path))
    return makedirs(path, *args, **kwargs)
  monkeypatch.setattr(os, 'makedirs', refuse)
  message = _error(tree, locked)
  assert message.startswith(f'The dataset cannot be written into the data_dir {locked} '
                            '(PermissionError: Permission denied')


def test_a_file_format_other_than_the_built_one(tree, tmp_path):
  _build(tree, tmp_path / 'data')
  where = tmp_path / 'data' / 'mura' / '1.1.0'
  for manual_dir in (tree, None):
    message = _error(manual_dir, tmp_path / 'data', file_format='tfrecord')
    assert message.startswith(f'{where} already holds mura built as array_record, not tfrecord: '
                              'give no --file_format (or array_record) to use it')
  assert _build(None, tmp_path / 'data').info.file_format.value == 'array_record'


def test_a_data_dir_that_is_the_built_datasets_own_folder(tree, tmp_path):
  _build(tree, tmp_path / 'data')
  for given in (tmp_path / 'data' / 'mura', tmp_path / 'data' / 'mura' / '1.1.0'):
    message = _error(None, given)
    assert message.startswith(f'{given} holds no built mura dataset ({given} is the mura/')
    assert f'give --data_dir {tmp_path / "data"})' in message


def test_the_tfds_api_does_not_reuse_a_build_of_other_data_either(tree, tmp_path):
  _build(tree, tmp_path / 'data')
  other = tmp_path / 'other'
  shutil.copytree(tree, other)
  labels = other / 'MURA-v1.1' / 'train_labeled_studies.csv'
  labels.write_text('\n'.join(labels.read_text().splitlines()[:-1]) + '\n')
  builder = tfds.builder('mura', data_dir=tmp_path / 'data')
  with pytest.raises(tfds_mura.MuraDataError, match=f'but the manual_dir {other} holds another'):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=other))


def test_num_workers_must_be_positive(tmp_path, capsys):
  with pytest.raises(SystemExit):
    build.main(['--data_dir', str(tmp_path), '--num_workers', '0'])
  assert "argument --num_workers: '0' is not a whole number of processes >= 1" in (
      capsys.readouterr().err)
