"""Every bad input of the dataset builder (`python -m tfds_mura.build`, and the data step of
`python -m mura_jax.main`) and the message it must print. (The CSV checks themselves, rows and
files, are in test_tfds_mura.py; this file adds what comes in one run and what is never silent.)

    input                                         message (start)
    MURA-v1.1.zip truncated, or not a zip         F (N bytes) is not a readable zip (...): a
                                                    truncated or damaged download? ...
    CSV problems and bad images, both splits      The build stopped and wrote nothing: K in the
                                                    CSVs and their files and M corrupt, ... (one error)
    CRLF line ends in a CSV                       warning: F has CRLF (Windows) line ends ...
    a transparent RGBA view, a colour photograph  warning: N image(s) were not plain radiographs;
                                                    ... composited onto black / colour image ...
    a data_dir that holds a build, empty manual   D already holds a built mura dataset (...), and
      dir                                           the manual_dir M has no MURA-v1.1 ...
    a data_dir built from other CSVs              D already holds a mura dataset built from ...,
                                                    but the manual_dir M holds another MURA
    the same data_dir and manual_dir again        warning: Using the mura dataset already built
"""

import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tfds_mura
from tfds_mura import build
from tfds_mura.mura import mura_dataset_builder as mura




def _build(manual_dir, data_dir):
  return build.build(manual_dir and str(manual_dir), str(data_dir), num_workers=1)


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


def test_build_command_without_manual_dir_and_nothing_built(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'tfds_mura.build', '--data_dir', str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert f'error: {tmp_path} holds no built mura dataset, and no manual_dir' in out.stderr
