"""Class activation maps: the identity with the logit, the geometry back to the radiograph, the
localisation measures, and the CAM mode's files."""

import csv
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mura_jax.data import input_pipeline
from mura_jax.data import preprocessing
from mura_jax.inference import display_scale
from mura_jax.inference import predictor as predictor_lib
from mura_jax.inference import steps as inference_steps
from mura_jax.interpretation import cam
from mura_jax.interpretation import localisation
from mura_jax.interpretation import maps as maps_lib
from mura_jax.interpretation import sanity
from mura_jax.models import densenet

TINY = {'arch': 'custom', 'in_channels': 3, 'num_classes': 1, 'growth_rate': 4,
        'block_config': [2, 2], 'num_init_features': 8, 'bn_size': 2}


@pytest.mark.parametrize('resize', ['squash', 'pad'])
def test_map_mean_plus_bias_is_the_logit(resize):
  model = densenet.create_model(TINY)
  variables = densenet.init_variables(model, jax.random.PRNGKey(0), 64, 3)
  # Non-zero bias and randomised batch statistics, so the identity is not trivially 0 = 0.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.3 if 'bias' in jax.tree_util.keystr(path) else x, variables)
  rng = np.random.default_rng(0)
  views = [rng.integers(0, 256, (517, 389, 1), dtype=np.uint8),
           rng.integers(0, 256, (200, 300, 1), dtype=np.uint8)]
  spec = preprocessing.Preprocessing(64, resize, 3)
  batch = np.stack([preprocessing.view_input(v, spec) for v in views])
  logits, maps = jax.device_get(inference_steps.view_maps(variables, batch, model=model, in_channels=3))
  assert maps.shape == (2, 8, 8)  # output stride 8 for two dense blocks
  bias = inference_steps.classifier_bias(variables)
  np.testing.assert_allclose(maps.mean((1, 2)) + bias, logits, atol=1e-5)
  plain = model.apply(variables, preprocessing.normalize(jnp.asarray(batch), 3))[:, 0]
  np.testing.assert_allclose(logits, plain, atol=1e-5)
  # The display map is the fixed sigmoid scale: a flat map shows the view's probability.
  flat = np.full((8, 8), maps[0].mean())
  np.testing.assert_allclose(maps_lib.display_map(flat, bias), 1 / (1 + np.exp(-logits[0])), rtol=1e-5)


def test_flip_averaged_map_is_the_mean_of_the_view_and_its_mirror():
  """cam.flip_average: the view's map and its mirror's map mirrored back, averaged; the logit
  stays the view's own, and mean(M) + bias is the mean of the two logits."""
  model = densenet.create_model(TINY)
  variables = densenet.init_variables(model, jax.random.PRNGKey(1), 64, 3)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.3 if 'bias' in jax.tree_util.keystr(path) else x, variables)
  images = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 1), dtype=np.uint8)
  maps_of = functools.partial(inference_steps.view_maps, variables, model=model, in_channels=3)
  logits, plain = jax.device_get(maps_of(images))
  mirror_logits, mirror = jax.device_get(maps_of(images[:, :, ::-1]))
  averaged_logits, averaged = jax.device_get(maps_of(images, flip_average=True))
  np.testing.assert_allclose(averaged, (plain + mirror[:, :, ::-1]) / 2, atol=1e-5)
  np.testing.assert_allclose(averaged_logits, logits, atol=1e-5)
  bias = inference_steps.classifier_bias(variables)
  np.testing.assert_allclose(averaged.mean((1, 2)) + bias, (logits + mirror_logits) / 2,
                             atol=1e-5)
  # A random network is not mirror-symmetric: the averaged map is another map.
  assert np.abs(averaged - plain).max() > 1e-2


def test_how_maps_are_made_comes_from_the_config_or_the_workdir(tmp_path):
  """A predictor makes mirror-averaged maps where the config given, else the workdir's
  config.json, says cam.flip_average; a config.json that predates the key means plain maps."""
  from mura_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from mura_jax.configs import demo  # pylint: disable=g-import-not-at-top
  workdir_lib.write_config(tmp_path, demo.get_config())
  assert predictor_lib.flip_average_of(workdir_lib.read_config(tmp_path)) is True
  old = json.loads((tmp_path / 'config.json').read_text())
  del old['cam']['flip_average']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  assert predictor_lib.flip_average_of(workdir_lib.read_config(tmp_path)) is False
  assert predictor_lib.flip_average_of(None) is False


def _aligned_map(image, spec, cells):
  """A map that is exactly the fitted input, average-pooled to cells x cells (what a feature map
  of perfect localisation would be)."""
  fitted = preprocessing.view_input(image, spec)[..., 0].astype(np.float64)
  s = spec.image_size // cells
  return fitted.reshape(cells, s, cells, s).mean((1, 3))


@pytest.mark.parametrize('rows,columns', [(517, 389), (389, 517)])
@pytest.mark.parametrize('resize', ['squash', 'pad'])
def test_upsampled_map_peaks_on_an_off_centre_marker(rows, columns, resize):
  image = np.zeros((rows, columns, 1), np.uint8)
  top, left = int(rows * 0.7), int(columns * 0.2)  # off-centre, away from the borders
  image[top:top + 60, left:left + 60] = 255
  spec = preprocessing.Preprocessing(128, resize, 3)
  raw = _aligned_map(image, spec, 16)
  up = maps_lib.upsample(raw, rows, columns, spec)
  assert up.shape == (rows, columns)  # rows x columns, never transposed
  y, x = np.unravel_index(np.argmax(up), up.shape)
  assert top <= y < top + 60 and left <= x < left + 60, (y, x)
  py, px = maps_lib.peak(raw, rows, columns, spec)
  assert top - 2 <= py < top + 62 and left - 2 <= px < left + 62, (py, px)


def test_peak_of_a_border_cell_is_its_centre_not_the_corner():
  spec = preprocessing.Preprocessing(64, 'squash', 3)
  raw = np.zeros((8, 8))
  raw[0, 0] = 1.0  # the corner cell: the upsampled map is flat out to the image corner
  assert maps_lib.peak(raw, 400, 320, spec) == (25, 20)  # the cell's centre, 1/16 of each side in
  hist = sanity.peak_histogram(np.stack([raw] * 10))
  assert hist[0, 0] == 10 and hist.sum() == 10  # a fixed hotspot fills one bin


def test_peak_is_placed_within_its_cell_by_a_parabola():
  # Samples of a parabola peaking 0.3 cells past the middle one: its vertex, exactly.
  assert maps_lib.subcell_offset(*[-(x - 0.3) ** 2 for x in (-1, 0, 1)]) == pytest.approx(0.3)
  assert maps_lib.subcell_offset(1.0, 3.0, 1.0) == 0  # equal neighbours: the cell's centre
  assert maps_lib.subcell_offset(3.0, 3.0, 1.0) == -0.5  # a tie: on the edge between the two
  assert maps_lib.subcell_offset(1.0, 3.0, 3.0) == 0.5
  assert maps_lib.subcell_offset(2.0, 2.0, 2.0) == 0  # flat
  # A smooth evidence peaking off its cell's centre, on a 400 x 320 radiograph (squash, 8 x 8
  # map: cells of 50 x 40 px): the peak found is nearer the true one than the cell's centre is.
  spec = preprocessing.Preprocessing(64, 'squash', 3)
  cy, cx = 3.3, 5.85  # in cells; cell i's centre is at i + 0.5
  centres = np.arange(8) + 0.5
  raw = np.exp(-((centres[:, None] - cy) ** 2 + (centres[None, :] - cx) ** 2) / 2)
  row, column = maps_lib.peak(raw, 400, 320, spec)
  assert abs(row - cy * 50) <= 4 and abs(column - cx * 40) <= 4, (row, column)  # the cell's
  # centre, (175, 220), is 10 and 14 px off. The same cell with equal neighbours: its centre.
  symmetric = np.zeros((8, 8))
  symmetric[2:5, 5] = symmetric[3, 4:7] = [1.0, 2.0, 1.0]
  assert maps_lib.peak(symmetric, 400, 320, spec) == (175, 220)


def test_localisation_measures_on_hand_made_maps():
  box = ('lesion', 40, 20, 60, 50)  # x0, y0, x1, y1
  assert localisation.distance_to_box(30, 50, box) == 0
  assert localisation.distance_to_box(30, 75, box) == pytest.approx(16)  # 16 px right of x1 - 1 = 59
  score_map = np.zeros((100, 100))
  score_map[20:50, 40:60] = 1.0
  result = localisation.score_view(score_map, box)
  assert result == {'pointing': 1.0, 'pointing_cell': 1.0, 'pointing_15px': 1.0,
                    'otsu_iou': 1.0, 'otsu_hit': 1.0}
  miss = localisation.score_view(np.roll(score_map, 40, axis=1), box)
  assert miss['pointing'] == 0 and miss['otsu_iou'] == 0
  # One map cell: a 8 x 8 map over a 400 x 320 radiograph (squash) has cells of 50 x 40 px. A
  # peak 16 px right of the box is within a cell; 45 px right and 10 px below it is not (10 <= 50
  # rows, but 45 > 40 columns); 30 px above it is.
  spec = preprocessing.Preprocessing(image_size=64, resize='squash', in_channels=3)
  cell = localisation.cell_size(400, 320, (8, 8), spec)
  assert cell == pytest.approx((50.0, 40.0))
  for peak_at, cell_hit in (((30, 75), 1.0), ((59, 104), 0.0), ((-10, 50), 1.0)):
    scored = localisation.score_view(score_map, box, peak_at, cell)
    assert scored['pointing'] == 0 and scored['pointing_cell'] == cell_hit, peak_at
  # 'pad' keeps the aspect ratio: a 400 x 200 radiograph in a 400 px square, cells of 50 px.
  padded = preprocessing.Preprocessing(image_size=64, resize='pad', in_channels=3)
  assert localisation.cell_size(400, 200, (8, 8), padded) == pytest.approx((50.0, 50.0))
  # Otsu splits a bimodal histogram between its modes.
  low, high = np.random.default_rng(0).normal(0, 0.1, 500), np.random.default_rng(1).normal(
      5, 0.1, 500)
  assert low.max() < localisation.otsu_threshold(np.r_[low, high]) < high.min()
  # A paired bootstrap of identical scores is exactly 0.
  ones = np.ones(50)
  assert localisation.bootstrap_rate(ones, 100, baseline=ones) == {
      'value': 0.0, 'ci_low': 0.0, 'ci_high': 0.0, 'n_views': 50}


def test_cascading_randomisation_reinitialises_from_the_classifier_down():
  model = densenet.create_model(TINY)
  variables = densenet.init_variables(model, jax.random.PRNGKey(0), 32, 3)
  stages = sanity.cascading_stages(variables, model, 3, seed=5)
  fresh = jax.jit(functools.partial(model.init, train=False))(  # as cascading_stages draws it
      jax.random.PRNGKey(5), jnp.zeros((1, 32, 32, 3)))
  assert [name for name, _ in stages] == [
      'classifier', '+ denseblock2', '+ denseblock1', '+ stem (conv0, norm0)']
  order = [['classifier'], ['denseblock2', 'norm5'], ['denseblock1', 'transition1'],
           ['conv0', 'norm0']]

  def module(tree, name):
    return tree['params'][name] if name == 'classifier' else tree['params']['features'][name]

  for k, (_, stage) in enumerate(stages):
    for j, names in enumerate(order):
      for name in names:  # re-initialised up to this stage (cumulative), trained below it
        expected = fresh if j <= k else variables
        for a, b in zip(jax.tree.leaves(module(stage, name)),
                        jax.tree.leaves(module(expected, name))):
          np.testing.assert_array_equal(a, b)
        if name in stage['batch_stats']['features']:  # statistics go with their parameters
          for a, b in zip(jax.tree.leaves(stage['batch_stats']['features'][name]),
                          jax.tree.leaves(expected['batch_stats']['features'][name])):
            np.testing.assert_array_equal(a, b)
  assert not np.allclose(jax.tree.leaves(module(fresh, 'denseblock1'))[0],
                         jax.tree.leaves(module(variables, 'denseblock1'))[0])


def test_controls_against_the_trained_model_are_paired():
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(40, 4, 4))
  controls = {'same': [maps.copy()], 'reversed': [-maps],
              'two draws': [maps.copy(), -maps]}  # a random network drawn twice
  trained = np.ones(40)
  hits = {'trained': trained, 'same': trained.copy(), 'reversed': (np.arange(40) % 2).astype(float),
          'two draws': np.stack([trained, np.zeros(40)])}  # (draws, views)
  result = sanity.against_trained(maps, controls, hits, list(range(40)), num_resamples=200)
  assert result['same']['rank_correlation']['value'] == pytest.approx(1.0)
  assert result['reversed']['rank_correlation']['value'] == pytest.approx(-1.0)
  same = result['same']['trained_minus_control']
  assert same['value'] == same['ci_low'] == same['ci_high'] == 0.0  # paired: the same views
  diff = result['reversed']['trained_minus_control']
  assert diff['value'] == 0.5 and 0.3 < diff['ci_low'] < 0.5 < diff['ci_high'] < 0.7
  assert result['reversed']['pointing']['value'] == 0.5
  # Two draws, one pointing at every box and one at none: each view's hit is their mean (0.5),
  # each draw's own pointing is kept, and their maps' correlations average to 0.
  drawn = result['two draws']
  assert drawn['draws'] == 2 and drawn['pointing_per_draw'] == [1.0, 0.0]
  assert drawn['pointing']['value'] == 0.5
  assert drawn['pointing']['ci_low'] == drawn['pointing']['ci_high'] == 0.5  # every view: 0.5
  assert drawn['rank_correlation']['value'] == pytest.approx(0.0)


def test_cam_mode_writes_overlays_and_localisation(trained_workdir, synthetic_dir):
  workdir, config = trained_workdir
  config = config.copy_and_resolve_references()
  config.cam.annotations = str(synthetic_dir / 'synthetic_annotations.csv')
  config.cam.num_abnormal, config.cam.num_uncertain = 2, 1
  config.cam.bootstrap_resamples = 200
  # Mirror-averaged maps, for the model and every control alike: the stand-in below, made
  # otherwise, would not come out identical.
  config.cam.flip_average = True
  # A stand-in for training's shuffled-labels control: the trained model itself, so it must
  # come out identical to the trained model (pointing difference 0, rank correlation 1).
  control = workdir / 'controls' / 'shuffled_labels'
  shutil.copytree(workdir / 'best', control / 'best')
  try:
    summary = cam.run(config, str(workdir))
  finally:
    shutil.rmtree(workdir / 'controls')
  out = workdir / 'cam' / 'validation'
  assert len(summary['studies']) == 3
  shuffled = summary['sanity']['controls']['shuffled labels']
  assert summary['sanity']['shuffled_labels_checkpoint']['directory'] == str(control / 'best')
  assert shuffled['rank_correlation']['value'] == pytest.approx(1.0)
  assert shuffled['trained_minus_control']['value'] == 0.0
  # The studies drawn: the 2 most confidently abnormal, then the one closest to the threshold,
  # by the probabilities evaluate mode wrote for the same checkpoint.
  with open(workdir / 'eval' / 'validation' / 'study_probabilities.csv', encoding='utf-8') as f:
    probability = {r['study'].removeprefix('MURA-v1.1/').strip('/'): float(r['probability'])
                   for r in csv.DictReader(f)}
  by_confidence = sorted(probability, key=lambda s: -probability[s])
  uncertain = min((s for s in probability if s not in by_confidence[:2]),
                  key=lambda s: abs(probability[s] - config.evaluation.threshold))
  assert [os.path.basename(s) for s in summary['studies']] == [
      s.replace('/', '_') for s in by_confidence[:2] + [uncertain]]
  for folder in summary['studies']:
    pngs = sorted(p.name for p in (out / 'studies' / folder.rsplit('/', 1)[-1]).iterdir())
    assert 'study.png' in pngs and any(p.startswith('image') for p in pngs)
  written = json.loads((out / 'localisation.json').read_text())
  local = written['localisation']
  assert local['n_views'] > 0 and set(local['groups']['all']) == set(localisation.METHODS)
  assert any(g.startswith('abnormality/') for g in local['groups'])
  for method in localisation.METHODS:
    entry = local['groups']['all'][method]['pointing']
    assert 0 <= entry['ci_low'] <= entry['value'] <= entry['ci_high'] <= 1
  assert set(local['advantage']) == set(localisation.METHODS[1:])
  checks = written['sanity']
  assert 0 <= checks['blank_image']['probability'] <= 1
  # Every cascading stage measured against the trained model on the same annotated views.
  stages = [k for k in checks['controls'] if k.startswith('randomised: ')]
  assert len(stages) == len(config.model.block_config) + 2  # classifier, each block, the stem
  for name in stages:
    entry = checks['controls'][name]
    assert -1 <= entry['rank_correlation']['value'] <= 1
    assert entry['pointing']['n_views'] == local['n_views']
    # each stage drawn as often as configured, each draw's pointing kept beside the mean
    assert entry['draws'] == config.cam.randomisation_draws == len(entry['pointing_per_draw'])
    assert entry['pointing']['value'] == pytest.approx(np.mean(entry['pointing_per_draw']))
    assert entry['trained_minus_control']['ci_low'] <= entry['trained_minus_control']['value']
  regions = checks['peak_regions']['models']
  assert set(regions) == {'trained', 'image intensity', 'shuffled labels', *stages}
  for region in ('border', 'margin', 'border, p > 0.5', 'border, p <= 0.5'):
    assert 0 <= regions['trained'][region]['chance']['value'] <= 1
  assert regions['trained']['border']['chance']['value'] == pytest.approx(0.4375, abs=0.01)
  # The display scale: fixed from the validation maps, stored for the checkpoint, read back.
  stored = json.loads((workdir / 'cam' / 'display_scale.json').read_text())
  assert stored['step'] == summary['checkpoint']['step'] and stored['top'] > 0
  predictor = predictor_lib.Predictor.from_workdir(workdir, 'best', config=config)
  assert predictor.display_scale() == stored
  assert display_scale.read(workdir / 'cam' / 'display_scale.json', stored['step'] + 1) is None
  text = (out / 'localisation.md').read_text()
  assert 'pointing' in text and 'randomised: classifier' in text and 'shuffled labels' in text
  assert summary['flip_average'] and "the mean of the view's and its mirror's map" in text
  assert predictor.flip_average  # from the config given ...
  # ... else from the workdir's config.json (the fixture's run: the paper's plain maps)
  assert not predictor_lib.Predictor.from_workdir(workdir, 'best').flip_average


def _pointing_maps(image_paths, boxes, shapes, spec, cells):
  """(V, cells, cells) maps that point: 1 at the cells whose centre, carried through the
  preprocessing's fit (`preprocessing.fit_box`) back to the radiograph, lies inside the view's
  box; 0 elsewhere and on views without a box."""
  maps = np.zeros((len(image_paths), cells, cells))
  centre = (np.arange(cells) + 0.5) * spec.image_size / cells  # in the network's input
  for v, path in enumerate(image_paths):
    if path not in boxes:
      continue
    x0, y0, x1, y1 = boxes[path]
    rows, columns = shapes[path]
    top, left, height, width = preprocessing.fit_box(rows, columns, spec.image_size, spec.resize)
    row = (centre - top) * rows / height
    column = (centre - left) * columns / width
    maps[v] = np.outer((y0 <= row) & (row < y1), (x0 <= column) & (column < x1))
    assert maps[v].any(), f'no cell centre in the box of {path}'
  return maps


def test_cam_mode_pointing_beats_the_random_baseline_with_maps_that_point(
    trained_workdir, synthetic_dir, monkeypatch):
  """The fixture's model is too weak to point (2 epochs at 32 px: its CAMs hit 5 of the 45
  boxes, the random map 2, so "beats random" there would be chance): cam mode is handed maps that
  point, and must score them 1 and above the random map, through its own reading of the split,
  the images, the boxes and the inverse of the preprocessing."""
  workdir, config = trained_workdir
  with open(synthetic_dir / 'synthetic_annotations.csv', encoding='utf-8') as f:
    boxes = {r['image_path']: tuple(int(r[k]) for k in ('x0', 'y0', 'x1', 'y1'))
             for r in csv.DictReader(f) if r['image_path'].startswith('MURA-v1.1/valid/')}
  index = input_pipeline.read_split_index(config.data.data_dir, 'validation')
  shapes = {p: Image.open(synthetic_dir / p).size[::-1] for p in boxes}  # (rows, columns)
  spec = preprocessing.Preprocessing.from_config(config)
  pointing = _pointing_maps(index.image_path, boxes, shapes, spec, cells=64)
  real_predict_split, calls = inference_steps.predict_split, []

  def predict_split(*args, **kwargs):  # the trained model's maps point; its controls' are real
    out = real_predict_split(*args, **kwargs)
    calls.append(1)
    return {**out, 'map': pointing} if len(calls) == 1 else out

  monkeypatch.setattr(inference_steps, 'predict_split', predict_split)
  # The maps that point are 64 x 64, the controls' 4 x 4: no rank correlation between them.
  monkeypatch.setattr(sanity, 'rank_correlation', lambda a, b: 0.0)
  run = config.copy_and_resolve_references()
  run.cam.annotations = str(synthetic_dir / 'synthetic_annotations.csv')
  run.cam.num_abnormal, run.cam.num_uncertain, run.cam.bootstrap_resamples = 1, 0, 200
  summary = cam.run(run, str(workdir))
  local = summary['localisation']
  assert local['n_views'] == len(boxes)
  assert 'No shuffled-labels model' in (workdir / 'cam' / 'validation' / 'localisation.md'
                                         ).read_text()
  scored = local['groups']['all']
  assert scored['cam']['pointing']['value'] == 1.0
  assert scored['random']['pointing']['value'] < 0.5
  assert local['advantage']['random']['ci_low'] > 0  # paired over the same resampled views
  # The controls (random networks) do not point: the trained model beats each, paired.
  checks = summary['sanity']['controls']
  for name in (k for k in checks if k.startswith('randomised: ')):
    assert checks[name]['trained_minus_control']['ci_low'] > 0, name
