"""The synthetic MURA-v1.1 must look like the real one to any code that reads MURA."""

import collections
import csv
import hashlib
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from mura_jax.data import synthetic
from mura_jax.data import synthetic_views
from tfds_mura import ANNOTATIONS_FILE
from tfds_mura import CONFOUNDERS_FILE

from conftest import STUDIES_PER_PART, VALID_STUDIES_PER_PART

IMAGE_RE = re.compile(r'^MURA-v1\.1/(train|valid)/(XR_[A-Z]+)/patient(\d{5})/study(\d+)_(positive|negative)/image(\d+)\.png$')
STUDY_RE = re.compile(r'^MURA-v1\.1/(train|valid)/(XR_[A-Z]+)/patient(\d{5})/study(\d+)_(positive|negative)/$')


def read_lines(path):
  data = path.read_bytes()
  assert b'\r' not in data, f'{path} must use LF line ends like the official CSVs'
  return data.decode().splitlines()


def test_csvs_have_muras_exact_format(synthetic_dir):
  root = synthetic_dir / 'MURA-v1.1'
  for split, studies in (('train', STUDIES_PER_PART), ('valid', VALID_STUDIES_PER_PART)):
    label_rows = [line.split(',') for line in read_lines(root / f'{split}_labeled_studies.csv')]
    assert len(label_rows) == studies * len(synthetic.PART_FOLDERS)
    for path, label in label_rows:  # no header: every row is a study path and a 0/1 label
      match = STUDY_RE.match(path)
      assert match and match[1] == split, path
      assert label == ('1' if match[5] == 'positive' else '0'), (path, label)
    image_rows = read_lines(root / f'{split}_image_paths.csv')
    assert all(IMAGE_RE.match(p) and ',' not in p for p in image_rows)
    # Every study's images are listed, numbered image1..imageN, N in 1..11.
    views = collections.defaultdict(list)
    for p in image_rows:
      views[p.rsplit('/', 1)[0] + '/'].append(int(IMAGE_RE.match(p)[6]))
    assert set(views) == {path for path, _ in label_rows}
    assert all(v == list(range(1, len(v) + 1)) and 1 <= len(v) <= 11 for v in views.values())
    # Grouped by body part, in MURA's own unsorted order, in both CSVs.
    for rows in ([p for p, _ in label_rows], image_rows):
      parts = [STUDY_RE.match(p.rsplit('/', 1)[0] + '/')[2] for p in rows]
      groups = [k for i, k in enumerate(parts) if i == 0 or parts[i - 1] != k]
      assert tuple(groups) == synthetic.CSV_PART_ORDER[split]
      assert list(groups) != sorted(groups)


def test_files_on_disk_are_exactly_the_csvs_plus_sidecars(synthetic_dir):
  root = synthetic_dir / 'MURA-v1.1'
  listed = {p for split in ('train', 'valid') for p in read_lines(root / f'{split}_image_paths.csv')}
  on_disk = {str(p.relative_to(synthetic_dir)) for p in root.rglob('*.png')}
  sidecars = {p for p in on_disk if p.rsplit('/', 1)[1].startswith('._')}
  assert on_disk - sidecars == listed
  assert sidecars, 'some studies must carry macOS ._imageN.png sidecars'
  for p in sidecars:  # AppleDouble files, not images
    with pytest.raises(Image.UnidentifiedImageError):
      Image.open(synthetic_dir / p)


def test_images_look_like_muras(synthetic_dir):
  root = synthetic_dir / 'MURA-v1.1'
  modes_per_study = collections.defaultdict(set)
  shapes = []
  for split in ('train', 'valid'):
    for p in read_lines(root / f'{split}_image_paths.csv'):
      with Image.open(synthetic_dir / p) as image:
        modes_per_study[p.rsplit('/', 1)[0]].add(image.mode)
        pixels = np.asarray(image)
        shapes.append(image.size)
        if image.mode in ('RGB', 'RGBA'):  # colour files carry a gray image in equal channels
          assert np.array_equal(pixels[..., 0], pixels[..., 1])
          assert np.array_equal(pixels[..., 0], pixels[..., 2])
        gray = pixels if pixels.ndim == 2 else pixels[..., 0]
        assert gray.dtype == np.uint8 and np.median(gray) < 100, 'a dark field with bright bone'
        assert gray.max() > 150
  modes = collections.Counter(m for s in modes_per_study.values() for m in s)
  assert set(modes) == {'L', 'RGB', 'RGBA'}
  assert any(len(m & {'L'}) and len(m - {'L'}) for m in modes_per_study.values()), 'mixed studies'
  long_sides = np.array([max(s) for s in shapes])
  short_sides = np.array([min(s) for s in shapes])
  assert np.mean(long_sides == 512) > 0.6 and short_sides.min() >= 89 and long_sides.max() == 512
  assert len(set(shapes)) > len(shapes) / 4, 'sizes and aspect ratios vary'


def test_patients_and_study_numbers(synthetic_dir):
  root = synthetic_dir / 'MURA-v1.1'
  patients = {}
  studies = collections.defaultdict(set)  # (split, patient, K) -> body parts
  for split in ('train', 'valid'):
    rows = [STUDY_RE.match(line.split(',')[0]) for line in read_lines(root / f'{split}_labeled_studies.csv')]
    patients[split] = {m[3] for m in rows}
    for m in rows:
      studies[(split, m[3], m[4])].add(m[2])
  assert not patients['train'] & patients['valid'], 'patients never cross splits'
  # A study is (split, body part, patient, study): the same studyK under several body parts.
  assert any(len(parts) > 1 for parts in studies.values())


def test_annotations_mark_abnormal_views_inside_the_image(synthetic_dir):
  with open(synthetic_dir / ANNOTATIONS_FILE) as f:
    rows = list(csv.DictReader(f))
  assert rows and set(rows[0]) == {'image_path', 'abnormality', 'x0', 'y0', 'x1', 'y1'}
  annotated_studies = set()
  for row in rows:
    assert '_positive/' in row['image_path'] and row['abnormality'] in synthetic.ABNORMALITIES
    with Image.open(synthetic_dir / row['image_path']) as image:
      w, h = image.size
      gray = np.asarray(image.convert('L'), np.float32)
    x0, y0, x1, y1 = (int(row[k]) for k in ('x0', 'y0', 'x1', 'y1'))
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, row
    # The abnormality is localised: the box is a small part of the view and looks different.
    assert (x1 - x0) * (y1 - y0) < 0.5 * w * h
    inside = gray[y0:y1, x0:x1]
    assert inside.max() - inside.min() > 60  # subtle (a fracture line), yet visible
    annotated_studies.add(row['image_path'].rsplit('/', 1)[0])
  positives = {line.split(',')[0].rstrip('/') for split in ('train', 'valid') for line in
               read_lines(synthetic_dir / 'MURA-v1.1' / f'{split}_labeled_studies.csv')
               if line.endswith(',1')}
  assert annotated_studies == positives, 'every abnormal study shows its abnormality somewhere'


def test_confounders_are_marked_in_both_classes(synthetic_dir):
  with open(synthetic_dir / CONFOUNDERS_FILE) as f:
    rows = list(csv.DictReader(f))
  assert rows and set(rows[0]) == {'image_path', 'confounder', 'x0', 'y0', 'x1', 'y1'}
  listed = {p for split in ('train', 'valid')
            for p in read_lines(synthetic_dir / 'MURA-v1.1' / f'{split}_image_paths.csv')}
  kinds_by_class = collections.defaultdict(set)
  for row in rows:
    assert row['image_path'] in listed and row['confounder'] in synthetic_views.CONFOUNDERS, row
    with Image.open(synthetic_dir / row['image_path']) as image:
      w, h = image.size
      gray = np.asarray(image.convert('L'))
    x0, y0, x1, y1 = (int(row[k]) for k in ('x0', 'y0', 'x1', 'y1'))
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, row
    # Radio-opaque or burned in: it stands out of its view.
    assert gray[y0:y1, x0:x1].max() > np.median(gray) + 100, row
    kinds_by_class['_positive/' in row['image_path']].add(row['confounder'])
  assert kinds_by_class[True] >= {'marker', 'text'} and kinds_by_class[False] >= {'marker', 'text'}


def _draws(abnormality, n, seed):
  rng = np.random.default_rng(seed)
  return [synthetic_views.draw_view(str(rng.choice(synthetic.PART_FOLDERS)), abnormality, rng)
          for _ in range(n)]


def test_confounders_and_margins_do_not_depend_on_the_class():
  """Markers, text, rulers and black margins appear at the same rates in normal and abnormal
  views: a model can learn the class only from the abnormality."""
  def rates(views):
    black_corner = [min(v.pixels[0, 0], v.pixels[0, -1], v.pixels[-1, 0], v.pixels[-1, -1]) == 0
                    for v in views]
    kinds = [{k for k, _ in v.confounders} for v in views]
    return np.array([np.mean(black_corner)] + [np.mean([k in ks for ks in kinds])
                                               for k in synthetic_views.CONFOUNDERS])
  normal = rates(_draws(None, 150, seed=1))
  abnormal = rates(_draws('fracture', 150, seed=2))
  assert np.all(normal[:3] > 0.3), normal   # margins, markers, text: in most views
  assert normal[3] > 0.1, normal            # rulers: in some
  np.testing.assert_allclose(abnormal, normal, atol=0.12)


def test_the_abnormality_is_not_the_brightest_thing_in_its_view():
  """On the old synthetic MURA the abnormality was the brightest, most textured thing in a view,
  so any map that peaks on bright regions 'found' it: the image intensity, smoothed at a 16 x 16
  map's scale, peaked in the box in 46% of abnormal views (180 draws, this test's seeds); here
  mostly on markers, text, collimator bands and bone (17%)."""
  views = [v for kind in synthetic_views.ABNORMALITIES for v in _draws(kind, 60, seed=3)]
  in_box = []
  for v in views:
    brightness = ndimage.uniform_filter(v.pixels.astype(np.float64), min(v.pixels.shape) // 16)
    y, x = np.unravel_index(np.argmax(brightness), brightness.shape)
    x0, y0, x1, y1 = v.box
    in_box.append(x0 <= x < x1 and y0 <= y < y1)
    # Still localised and visible: the box is small and its pixels differ.
    assert (x1 - x0) * (y1 - y0) < 0.25 * v.pixels.size
    assert np.ptp(v.pixels[y0:y1, x0:x1]) > 60
  assert np.mean(in_box) < 0.3, np.mean(in_box)


def _tree_digest(root):
  digest = hashlib.sha256()
  for p in sorted(root.rglob('*')):
    if p.is_file():
      digest.update(str(p.relative_to(root)).encode() + p.read_bytes())
  return digest.hexdigest()


def test_deterministic_per_seed(tmp_path):
  a = synthetic.make_synthetic_mura(tmp_path / 'a', 2, 1, seed=7, num_workers=2, progress=False)
  b = synthetic.make_synthetic_mura(tmp_path / 'b', 2, 1, seed=7, num_workers=1, progress=False)
  synthetic.make_synthetic_mura(tmp_path / 'c', 2, 1, seed=8, num_workers=1, progress=False)
  assert a['images'] == b['images']
  assert _tree_digest(tmp_path / 'a') == _tree_digest(tmp_path / 'b')
  assert _tree_digest(tmp_path / 'a') != _tree_digest(tmp_path / 'c')


def test_plan_follows_muras_view_counts_and_class_balance():
  studies = synthetic.plan_studies(studies_per_part=400, valid_studies_per_part=100, seed=0)
  train = [s for s in studies if s.split == 'train']
  views = np.array([s.num_views for s in train])
  for count, share in ((1, 0.08), (2, 0.28), (3, 0.48), (4, 0.14)):
    assert abs(np.mean(views == count) - share) < 0.03, count
  assert abs(np.mean(views >= 5) - 0.02) < 0.01 and views.max() <= 11
  for split in ('train', 'valid'):
    for part, (normal, abnormal) in synthetic.TABLE1_IMAGES[split].items():
      labels = [s.abnormal for s in studies if s.split == split and s.body_part == part]
      assert abs(np.mean(labels) - abnormal / (normal + abnormal)) < 0.01, (split, part)
  paths = [s.path for s in studies]
  assert len(paths) == len(set(paths)), 'study paths are unique'


def test_existing_output_is_not_overwritten(tmp_path):
  (tmp_path / 'MURA-v1.1').mkdir()
  (tmp_path / 'MURA-v1.1' / 'keep.txt').write_text('x')
  with pytest.raises(FileExistsError, match='MURA-v1.1'):
    synthetic.make_synthetic_mura(tmp_path, 1, 1, progress=False)
