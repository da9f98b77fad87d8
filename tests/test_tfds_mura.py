"""The `mura` TFDS builder: driven by the CSVs, cross-checked, readable without TensorFlow."""

import collections
import logging
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tfds_mura import build
from tfds_mura.mura import mura_dataset_builder as mura
import tfds_mura


def csv_counts(synthetic_dir):
  """(split, body_part, label) -> image count, parsed from the CSVs independently of the builder."""
  counts = collections.Counter()
  for split, tfds_split in (('train', 'train'), ('valid', 'validation')):
    for line in (synthetic_dir / 'MURA-v1.1' / f'{split}_image_paths.csv').read_text().splitlines():
      part = line.split('/')[2][3:].lower()
      counts[(tfds_split, part, int('_positive/' in line))] += 1
  return counts


def test_examples_equal_csv_rows_per_split_and_body_part(synthetic_dir, mura_data_dir):
  sources = tfds.data_source('mura', data_dir=mura_data_dir)
  counts = collections.Counter()
  for split, source in sources.items():
    for i in range(len(source)):
      ex = source[i]
      counts[(split, tfds_mura.BODY_PARTS[ex['body_part']], int(ex['label']))] += 1
  assert counts == csv_counts(synthetic_dir)
  # Sidecars (._imageN.png) sit beside the images and are not examples.
  assert any((synthetic_dir / 'MURA-v1.1').rglob('._image*.png'))


def test_metadata_has_the_weighted_loss_counts(synthetic_dir, mura_data_dir):
  info = tfds.builder('mura', data_dir=mura_data_dir).info
  expected = csv_counts(synthetic_dir)
  for split in ('train', 'validation'):
    counts = tfds_mura.image_counts(info, split)
    for part in tfds_mura.BODY_PARTS:
      assert counts[part] == {'normal': expected[(split, part, 0)], 'abnormal': expected[(split, part, 1)]}
  with pytest.raises(tfds_mura.MuraDataError, match='test'):
    tfds_mura.image_counts(info, 'test')


def test_features_of_each_view(synthetic_dir, mura_data_dir):
  source = tfds.data_source('mura', data_dir=mura_data_dir, split='validation')
  modes = set()
  for i in range(len(source)):
    ex = source[i]
    path = ex['image_path'].decode()
    image = ex['image']
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 1
    with Image.open(synthetic_dir / path) as original:
      modes.add(original.mode)
      pixels = np.asarray(original)
    # RGB/RGBA files hold a gray image in equal channels: grayscale keeps it exactly.
    gray = pixels if pixels.ndim == 2 else pixels[..., 0]
    np.testing.assert_array_equal(image[..., 0], gray)
    study = path[len('MURA-v1.1/'):].rsplit('/', 1)[0]
    assert ex['study_id'].decode() == study
    assert ex['label'] == int(study.endswith('_positive'))
    assert ex['patient_id'] == int(study.split('/')[2][len('patient'):])
    assert ex['view'] == int(path.rsplit('image', 1)[1][:-4])
    assert tfds_mura.BODY_PARTS[ex['body_part']] == study.split('/')[1][3:].lower()
  assert modes == {'L', 'RGB', 'RGBA'}


def test_another_process_reads_without_importing_tfds_mura(mura_data_dir):
  code = textwrap.dedent(f"""
      import sys
      import tensorflow_datasets as tfds
      sources = tfds.data_source('mura', data_dir={str(mura_data_dir)!r})
      ex = sources['train'][0]
      assert 'tfds_mura' not in sys.modules
      print(len(sources['train']), len(sources['validation']), ex['image'].shape[-1],
            'tensorflow' in sys.modules)
  """)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd='/')
  train, validation, channels, tf_imported = out.stdout.split()
  builder = tfds.builder('mura', data_dir=mura_data_dir)
  assert int(train) == builder.info.splits['train'].num_examples
  assert int(validation) == builder.info.splits['validation'].num_examples
  assert channels == '1' and tf_imported == 'False'


# ------------------------------------------------------------------------------------------------
# Manual-dir variants: the zip, header rows and CRLF line ends of redistributed copies.


def _build(manual_dir, data_dir, **kw):
  return build.build(str(manual_dir), str(data_dir), num_workers=1, **kw)


def _paths(data_dir):
  sources = tfds.data_source('mura', data_dir=data_dir)
  return {split: sorted(s[i]['image_path'] for i in range(len(s))) for split, s in sources.items()}


def test_zip_or_folder_give_the_same_dataset(tree, tmp_path):
  zipped = tmp_path / 'zipped'
  zipped.mkdir()
  with zipfile.ZipFile(zipped / 'MURA-v1.1.zip', 'w') as z:
    for p in sorted(tree.rglob('*')):
      z.write(p, p.relative_to(tree))
  _build(tree, tmp_path / 'from_folder')
  _build(zipped, tmp_path / 'from_zip')
  from_folder, from_zip = _paths(tmp_path / 'from_folder'), _paths(tmp_path / 'from_zip')
  assert from_folder == from_zip and len(from_folder['train']) > 0


def test_a_first_build_logs_no_warning(tree, tmp_path, caplog):
  """Nothing is wrong with a first build into a new data_dir: no warning (TFDS alone logs that
  the version folder it has not written yet has no dataset_info.json)."""
  with caplog.at_level(logging.WARNING):
    builder = _build(tree, tmp_path / 'data')
  assert builder.is_prepared()
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_header_rows_and_crlf_are_read_with_a_warning(tree, tmp_path, caplog):
  root = tree / 'MURA-v1.1'
  for name, header in (('train_labeled_studies.csv', 'Path,Label'), ('valid_image_paths.csv', 'Path')):
    rows = (root / name).read_text().splitlines()
    (root / name).write_bytes(('\r\n'.join([header] + rows) + '\r\n').encode())
  with caplog.at_level(logging.WARNING):
    _build(tree, tmp_path / 'data')
  assert 'header' in caplog.text and 'train_labeled_studies.csv' in caplog.text
  counts = {split: len(paths) for split, paths in _paths(tmp_path / 'data').items()}
  assert counts == {
      'train': len((root / 'train_image_paths.csv').read_text().splitlines()),
      'validation': len((root / 'valid_image_paths.csv').read_text().splitlines()) - 1}


# ------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file and row, never a silently smaller dataset.


def _edit(tree, name, edit):
  path = tree / 'MURA-v1.1' / name
  lines = path.read_text().splitlines()
  path.write_text('\n'.join(edit(lines)) + '\n')
  return lines


def test_csv_image_without_file(tree, tmp_path):
  lines = _edit(tree, 'valid_image_paths.csv', lambda lines: lines)
  (tree / lines[0]).unlink()
  (tree / lines[-1]).unlink()
  with pytest.raises(tfds_mura.MuraDataError, match=r'\(2\)') as e:
    _build(tree, tmp_path / 'data')
  assert lines[0] in str(e.value) and lines[-1] in str(e.value)


def test_image_whose_study_has_no_label_row(tree, tmp_path):
  lines = _edit(tree, 'train_labeled_studies.csv', lambda lines: lines[1:])
  with pytest.raises(tfds_mura.MuraDataError, match='no row in train_labeled_studies.csv') as e:
    _build(tree, tmp_path / 'data')
  assert lines[0].split(',')[0] in str(e.value) and 'train_image_paths.csv line' in str(e.value)


def test_label_that_contradicts_the_folder(tree, tmp_path):
  def flip(lines):
    path, label = lines[2].split(',')
    return lines[:2] + [f'{path},{1 - int(label)}'] + lines[3:]
  lines = _edit(tree, 'valid_labeled_studies.csv', flip)
  with pytest.raises(tfds_mura.MuraDataError, match='valid_labeled_studies.csv line 3') as e:
    _build(tree, tmp_path / 'data')
  assert 'contradicts the folder name' in str(e.value) and lines[2].split(',')[0] in str(e.value)


def test_malformed_rows_and_duplicates(tree, tmp_path):
  _edit(tree, 'train_labeled_studies.csv', lambda lines: lines + [lines[0], 'MURA-v1.1/train/x/,2'])
  with pytest.raises(tfds_mura.MuraDataError) as e:
    _build(tree, tmp_path / 'data')
  assert 'listed twice' in str(e.value) and "label '2' is not 0 or 1" in str(e.value)


def test_corrupt_and_truncated_pngs_are_all_listed(tree, tmp_path):
  lines = (tree / 'MURA-v1.1' / 'valid_image_paths.csv').read_text().splitlines()
  truncated, corrupt = tree / lines[1], tree / lines[-1]
  truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
  corrupt.write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 100)
  with pytest.raises(tfds_mura.MuraDataError, match=r'2 corrupt, truncated or unsupported image.*\(2\)') as e:
    _build(tree, tmp_path / 'data')
  assert str(truncated) in str(e.value) and str(corrupt) in str(e.value)
  assert not (tmp_path / 'data' / 'mura' / '1.1.0' / 'dataset_info.json').exists()


@pytest.mark.parametrize('make', ['missing', 'empty', 'unrelated'])
def test_missing_or_empty_manual_dir_repeats_the_instructions(tmp_path, make):
  manual = tmp_path / 'manual'
  if make != 'missing':
    manual.mkdir()
  if make == 'unrelated':
    (manual / 'notes.txt').write_text('x')
  with pytest.raises(tfds_mura.MuraDataError) as e:
    _build(manual, tmp_path / 'data')
  assert 'MURA-v1.1.zip' in str(e.value) and mura.HOMEPAGE in str(e.value)


def test_tfrecord_output_for_tfds_load(tree, tmp_path):
  pytest.importorskip('tensorflow', reason='tfrecord output and tfds.load need TensorFlow')
  _build(tree, tmp_path / 'data', file_format='tfrecord')
  ds = tfds.load('mura', data_dir=tmp_path / 'data', split='validation')
  images = [ex['image'].shape for ex in ds]
  expected = len((tree / 'MURA-v1.1' / 'valid_image_paths.csv').read_text().splitlines())
  assert len(images) == expected and all(s[-1] == 1 for s in images)
  assert list((tmp_path / 'data' / 'mura' / '1.1.0').glob('*.tfrecord*'))


def test_build_command_prints_a_summary(tree, tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'tfds_mura.build', '--manual_dir', str(tree), '--data_dir',
       str(tmp_path / 'data'), '--num_workers', '2'], capture_output=True, text=True, check=True)
  assert 'images/s' in out.stdout and 'wrist' in out.stdout
  bad = subprocess.run(
      [sys.executable, '-m', 'tfds_mura.build', '--manual_dir', str(tmp_path / 'nowhere'),
       '--data_dir', str(tmp_path / 'data2')], capture_output=True, text=True)
  assert bad.returncode != 0 and 'MURA-v1.1.zip' in bad.stderr


def test_tfds_own_builder_test_case_passes():
  """TFDS's DatasetBuilderTestCase over dummy_data/, in its own process: it loads TensorFlow's
  test framework, which must not share a process with torch's kernels (they crash together)."""
  pytest.importorskip('tensorflow', reason='tfds.testing needs TensorFlow')
  import pathlib  # pylint: disable=g-import-not-at-top
  test = pathlib.Path(mura.__file__).with_name('mura_dataset_builder_test.py')
  out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', str(test)],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert ' passed' in out.stdout and 'failed' not in out.stdout
