"""CAM pictures and the sanity checks' regions: the display scale, captions, a layout that never
overlaps, the black margin, peaks on confounder boxes and borders, the shuffled-labels control."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mura_jax.data import dataset as data_lib
from mura_jax.data import input_pipeline
from mura_jax.data import preprocessing
from mura_jax.errors import DataError
from mura_jax.inference import display_scale
from mura_jax.interpretation import maps as maps_lib
from mura_jax.interpretation import pictures
from mura_jax.interpretation import sanity
from mura_jax.training import controls
from tfds_mura import BODY_PARTS


def _radiograph(rows=400, columns=300, angle=20):
  """A view rotated inside its frame as real MURA views are: black margin (0, a little noise)
  outside a collimated field (gray 12), a bright bone in it with a dark cavity (0) inside the
  field, and a white burned-in marker. Returns (image, the field's mask)."""
  field = Image.new('L', (columns, rows), 0)
  ImageDraw.Draw(field).polygon(_rotated_rectangle(rows, columns, 0.7, 0.8, angle), fill=255)
  inside = np.asarray(field) > 0
  image = np.where(inside, 12, 0).astype(np.float64)
  image[120:300, 130:170] = 180                          # the bone
  image[150:170, 140:160] = 0                            # a dark cavity, not connected to the edge
  image[60:80, 100:115] = 255                            # a marker "R"
  image += np.random.default_rng(0).integers(0, 3, image.shape)  # sensor noise in the margin
  return np.clip(image, 0, 255).astype(np.uint8), inside


def _rotated_rectangle(rows, columns, h_share, w_share, angle):
  cy, cx, h, w = rows / 2, columns / 2, rows * h_share, columns * w_share
  t = np.deg2rad(angle)
  corners = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
  return [(cx + x * np.cos(t) - y * np.sin(t), cy + x * np.sin(t) + y * np.cos(t))
          for x, y in corners]


def test_black_margin_is_the_dark_outside_connected_to_the_edge():
  image, inside = _radiograph()
  margin = sanity.black_margin(image)
  outside = ~inside
  agree = (margin == outside).mean()
  assert agree > 0.98, agree  # the 5 x 5 mean blurs the field's edge by a pixel or two
  assert not margin[150:170, 140:160].any()  # the cavity inside the field is not margin
  assert sanity.border(400, 300).mean() == pytest.approx(1 - 0.75 ** 2, abs=0.005)


def test_peak_regions_count_confounders_and_borders_against_chance(tmp_path):
  image, inside = _radiograph()
  csv = tmp_path / 'synthetic_confounders.csv'
  csv.write_text('image_path,confounder,x0,y0,x1,y1\n'
                 'a.png,marker,100,60,115,80\n' 'a.png,text,10,380,120,395\n'
                 'b.png,marker,100,60,115,80\n' 'c.png,ruler,280,50,295,350\n')
  confounders = sanity.read_confounders(csv)
  assert len(confounders['a.png']) == 2 and 'd.png' not in confounders
  paths = ['a.png', 'b.png', 'c.png', 'd.png']
  peaks = {
      'trained': [(200, 150), (200, 150), (200, 150), (200, 150)],   # on the bone: no confounder
      'on markers': [(70, 105), (70, 105), (100, 290), (5, 5)],      # every confounder view
  }
  peak_of = {model: [lambda i, image, at=at: at[i]] for model, at in peaks.items()}
  # Two draws of one control: the first on the bone, the second on the markers; each view
  # counts half of each region the second puts it in.
  peak_of['two draws'] = peak_of['trained'] + peak_of['on markers']
  result, found = sanity.peak_regions(peak_of, lambda i: image, paths,
                                      np.array([0.9, 0.2, 0.8, 0.1]), 0.5, confounders,
                                      {'a.png', 'c.png'}, num_resamples=200)
  assert result['n_views_with_confounders'] == 3
  assert found['trained'] == [[p] for p in peaks['trained']]
  assert found['two draws'] == [list(p) for p in zip(peaks['trained'], peaks['on markers'])]
  trained, marked = result['models']['trained'], result['models']['on markers']
  assert trained['confounders']['peaks']['value'] == 0.0
  assert marked['confounders']['peaks']['value'] == 1.0
  assert marked['confounders, abnormal-box views']['peaks']['n_views'] == 2
  share = (15 * 20 + 110 * 15) / (400 * 300)  # a.png's two boxes
  assert trained['confounders']['chance']['value'] == pytest.approx(
      (share + 15 * 20 / 1.2e5 + 15 * 300 / 1.2e5) / 3)
  # (100, 290) and (5, 5) are in the border (the outer 50 rows, 38 columns) and outside the
  # rotated field (the black margin); the bone's peaks are in neither.
  assert not inside[100, 290] and not inside[5, 5] and inside[70, 105]
  assert marked['border']['peaks']['value'] == 0.5 and trained['border']['peaks']['value'] == 0
  assert marked['margin']['peaks']['value'] == 0.5 and trained['margin']['peaks']['value'] == 0
  both = result['models']['two draws']
  assert both['confounders']['peaks']['value'] == 0.5 and both['border']['peaks']['value'] == 0.25
  assert trained['border, p > 0.5']['peaks']['n_views'] == 2
  border = trained['border']
  assert border['excess']['value'] == pytest.approx(-border['chance']['value'])
  csv.write_text('image_path,confounder,x0,y0,x1,y1\na.png,scar,1,1,5,5\n')
  with pytest.raises(DataError, match='row 2'):
    sanity.read_confounders(csv)


def test_display_scale_and_captions():
  maps = np.zeros((10, 4, 4))
  maps[:, 0, 0] = np.arange(10)  # one cell per view with evidence
  assert maps_lib.display_top(maps, 99) == pytest.approx(np.percentile(maps, 99))
  assert maps_lib.display_top(-np.ones((2, 2, 2))) == 1.0  # no evidence anywhere: still a scale
  assert 'no validation range stored' in maps_lib.DisplayScale.of(None).source
  scale = maps_lib.DisplayScale.of({'top': 4.0, 'percentile': 99, 'split': 'validation',
                                    'step': 7})
  assert scale.outline == 2.0 and 'step 7' in scale.source
  assert pictures.verdict_caption(0.49, 0.5) == 'p = 0.49 < 0.5: normal'
  assert pictures.verdict_caption(0.73, 0.5) == 'p = 0.73 > 0.5: abnormal'
  assert pictures.verdict_caption(0.4996, 0.5) == 'p = 0.4996 < 0.5: normal'  # not "0.50 <"
  assert pictures.verdict_caption(0.5, 0.5) == 'p = 0.50 = 0.5: normal'


def test_overlay_transparent_below_zero_outlined_and_peak_ringed():
  image, _ = _radiograph()
  rows, columns = image.shape
  upsampled = np.full((rows, columns), -1.0)
  upsampled[100:200, 100:200] = 3.0  # evidence in a square, above the outline level (2)
  scale = maps_lib.DisplayScale(4.0, 'test')
  picture = pictures.overlay(image, upsampled, scale, peak_at=(150, 150))
  gray = np.repeat(image[..., None], 3, axis=-1)
  np.testing.assert_array_equal(picture[300:, :], gray[300:, :])  # M <= 0: the radiograph alone
  assert (picture[100, 120:180] == 255).all()   # the outline on the region's edge, white
  assert (picture[100 - 1, 120:180] == 0).all()  # with a black edge outside it
  radius = max(6.0, 0.04 * min(rows, columns))
  assert (picture[int(150 - radius), 150] == 255).all() and not (picture[150, 150] == 255).all()


def test_study_figure_title_captions_and_colour_bar_never_overlap():
  image, _ = _radiograph()
  scale = maps_lib.DisplayScale(4.0, '99th percentile of M over the validation split (step 7)')
  tall = np.repeat(np.repeat(image[:, 100:200, None], 3, -1), 2, axis=0)  # a finger: 800 x 100
  for n, picture in ((1, tall), (2, tall), (5, image)):  # one row (the overlap: the
    views = [(f'image{k}.png', np.repeat(picture[..., None], 3, -1) if picture.ndim == 2
              else picture, 'p = 0.49 < 0.5: normal') for k in range(1, n + 1)]  # title on them)
    figure = pictures.study_figure('valid/XR_HUMERUS/patient1/study1_positive (label: abnormal)'
                                   f'\nstudy p = 0.49 < 0.5: normal (mean of {n} views)', views,
                                   1, scale)
    _assert_no_overlap(figure, n)
  # Two square views with the captions cam mode writes (peak M, the driver's line: four lines):
  # the demo's forearm study, whose driver caption ran into the title.
  square = np.repeat(image[:300, :300, None], 3, -1)
  views = [(f'image{k}.png', square, 'p = 0.99 > 0.5: abnormal\npeak M = 26.53') for k in (1, 2)]
  figure = pictures.study_figure('valid/XR_FOREARM/patient00354/study1_positive (label: '
                                 'abnormal)\nstudy p = 0.99 > 0.5: abnormal (mean of 2 views)',
                                 views, 1, scale)
  _assert_no_overlap(figure, 2)


def _assert_no_overlap(figure, n):
  figure.canvas.draw()
  renderer = figure.canvas.get_renderer()
  boxes = [figure._suptitle.get_window_extent(renderer),  # pylint: disable=protected-access
           figure._supxlabel.get_window_extent(renderer)]  # pylint: disable=protected-access
  for ax in figure.axes[:n]:
    boxes += [ax.title.get_window_extent(renderer), ax.get_window_extent(renderer)]
  bar = figure.axes[-1]
  boxes.append(bar.get_tightbbox(renderer))
  for i, a in enumerate(boxes):
    for b in boxes[i + 1:]:
      assert not a.overlaps(b) or a is b, (a, b)
  assert 'logit' in bar.get_ylabel()


def test_display_scale_file_round_trip(tmp_path):
  path = display_scale.workdir_path(tmp_path)
  display_scale.write(path, top=3.5, percentile=99, split='validation', n_views=10, step=12)
  assert display_scale.read(path, 12)['top'] == 3.5 and display_scale.read(path, 13) is None
  assert display_scale.copy_into_export(tmp_path, tmp_path, 12)
  assert display_scale.read(tmp_path / display_scale.EXPORT_FILE, 12)['top'] == 3.5
  assert not display_scale.copy_into_export(tmp_path, tmp_path, 13)
  path.write_text('{"top": "x"}')
  with pytest.raises(Exception, match='damaged'):
    display_scale.read(path, 12)


def test_shuffled_study_labels_are_permuted_within_body_part():
  rng = np.random.default_rng(1)
  study_part = np.repeat(np.arange(3), 40)             # 40 studies per body part
  study_label = (rng.random(120) < np.array([0.2, 0.5, 0.8])[study_part]).astype(np.int32)
  study_index = np.repeat(np.arange(120), rng.integers(1, 4, 120)).astype(np.int32)
  index = input_pipeline.SplitIndex(
      studies=tuple(map(str, range(120))), study_index=study_index,
      label=study_label[study_index], body_part=study_part[study_index].astype(np.int32),
      image_path=tuple(str(i) for i in range(len(study_index))))
  shuffled = controls.shuffled_study_labels(index, seed=0)
  per_study = {}
  for s, label in zip(study_index, shuffled):
    assert per_study.setdefault(s, label) == label  # one label per study
  per_study = np.array([per_study[s] for s in range(120)])
  for part in range(3):  # each body part keeps its number of abnormal studies
    assert per_study[study_part == part].sum() == study_label[study_part == part].sum()
  assert (per_study != study_label).mean() > 0.2  # and they moved
  source = controls.RelabelledSource([{'label': 1, 'image': 0}] * 3, [0, 1, 0])
  assert [source[i]['label'] for i in range(3)] == [0, 1, 0] and source[0]['image'] == 0


def test_training_trains_the_shuffled_labels_control_on_the_runs_data(mura_data_dir, tmp_path,
                                                                      monkeypatch):
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  from mura_jax.training import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'tfds').symlink_to(mura_data_dir)  # data_dir '': the run's data under its workdir
  config = tiny_config('', **{'train.shuffled_labels_control': True})
  calls = []

  def train_and_evaluate(config, workdir, relabel=None):
    calls.append((config, workdir, relabel))
    return {'status': 'done'}

  monkeypatch.setattr(train, 'train_and_evaluate', train_and_evaluate)
  assert train.run(config, str(workdir)) == 'done'
  (_, _, none), (control, control_dir, relabel) = calls
  assert none is None and control_dir == str(workdir / 'controls' / 'shuffled_labels')
  assert data_lib.dataset_dirs(control, control_dir) == data_lib.dataset_dirs(config, str(workdir))
  assert not control.train.shuffled_labels_control and control.after_training == ''
  data_dir = str(workdir / 'tfds')
  index = input_pipeline.read_split_index(data_dir, 'train')
  relabelled = relabel(input_pipeline.data_source(data_dir, 'train'), data_dir, list(BODY_PARTS))
  assert len(relabelled) == len(index) and relabelled[3]['label'] == relabelled.labels[3]
  for part in range(len(BODY_PARTS)):  # abnormal studies per body part: as many as before
    views = index.body_part == part
    studies = lambda labels: len(set(index.study_index[views & (labels == 1)]))  # noqa: E731
    assert studies(relabelled.labels) == studies(index.label)
  assert (relabelled.labels != index.label).any()
  calls.clear()
  config.train.shuffled_labels_control = False
  assert train.run(config, str(workdir)) == 'done' and len(calls) == 1


def test_draw_study_rings_a_peak_only_where_there_is_evidence(tmp_path):
  image, _ = _radiograph()
  spec = preprocessing.Preprocessing(64, 'squash', 3)
  scale = maps_lib.DisplayScale(4.0, 'test')
  evidence = np.full((8, 8), -1.0)
  evidence[2, 5] = 3.0
  drawn = pictures.draw_study(tmp_path, 'study\np = 0.6 > 0.5: abnormal', [
      ('image1.png', 'image1.png', image, evidence, 0.6),
      ('image2.png', 'image2.png', image, np.full((8, 8), -1.0), 0.2)], spec, scale, 0.5)
  assert drawn[0][2] == 'p = 0.60 > 0.5: abnormal\npeak M = 3.00'
  assert drawn[1][2] == 'p = 0.20 < 0.5: normal\nM <= 0 everywhere (no ring)'
  np.testing.assert_array_equal(drawn[1][1], np.repeat(image[..., None], 3, -1))  # untouched
  row, column = maps_lib.peak(evidence, *image.shape, spec)
  radius = max(6.0, 0.04 * min(image.shape))
  assert (drawn[0][1][int(round(row - radius)), column] == 255).all()  # the ring, white
  for name in ('image1.png', 'image2.png', 'study.png'):
    assert Image.open(tmp_path / name).size[0] > 100
