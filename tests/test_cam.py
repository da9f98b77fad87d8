"""Class activation maps: the identity with the logit, the geometry back to the radiograph, the
localisation measures, and the CAM mode's files."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mura_jax.data import input_pipeline
from mura_jax.data import preprocessing
from mura_jax.inference import steps as inference_steps
from mura_jax.interpretation import cam
from mura_jax.interpretation import localisation
from mura_jax.interpretation import maps as maps_lib
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
  hist = localisation.peak_histogram(np.stack([raw] * 10))
  assert hist[0, 0] == 10 and hist.sum() == 10  # a fixed hotspot fills one bin


def test_localisation_measures_on_hand_made_maps():
  box = ('lesion', 40, 20, 60, 50)  # x0, y0, x1, y1
  assert localisation.distance_to_box(30, 50, box) == 0
  assert localisation.distance_to_box(30, 75, box) == pytest.approx(16)  # 16 px right of x1 - 1 = 59
  score_map = np.zeros((100, 100))
  score_map[20:50, 40:60] = 1.0
  result = localisation.score_view(score_map, box)
  assert result == {'pointing': 1.0, 'pointing_15px': 1.0, 'otsu_iou': 1.0, 'otsu_hit': 1.0}
  miss = localisation.score_view(np.roll(score_map, 40, axis=1), box)
  assert miss['pointing'] == 0 and miss['otsu_iou'] == 0
  # Otsu splits a bimodal histogram between its modes.
  low, high = np.random.default_rng(0).normal(0, 0.1, 500), np.random.default_rng(1).normal(
      5, 0.1, 500)
  assert low.max() < localisation.otsu_threshold(np.r_[low, high]) < high.min()
  # A paired bootstrap of identical scores is exactly 0.
  ones = np.ones(50)
  assert localisation.bootstrap_rate(ones, 100, baseline=ones) == {
      'value': 0.0, 'ci_low': 0.0, 'ci_high': 0.0, 'n_views': 50}


def test_randomised_variables_change_the_head_and_last_block_only():
  model = densenet.create_model(TINY)
  variables = densenet.init_variables(model, jax.random.PRNGKey(0), 32, 3)
  randomised = localisation.randomised_variables(variables, model, seed=5)
  features, new = variables['params']['features'], randomised['params']['features']
  assert not np.allclose(variables['params']['classifier']['kernel'],
                         randomised['params']['classifier']['kernel'])
  assert not np.allclose(jax.tree.leaves(features['denseblock2'])[0],
                         jax.tree.leaves(new['denseblock2'])[0])
  for name in ('conv0', 'denseblock1', 'transition1'):
    for a, b in zip(jax.tree.leaves(features[name]), jax.tree.leaves(new[name])):
      np.testing.assert_array_equal(a, b)


def test_cam_mode_writes_overlays_and_localisation(trained_workdir, synthetic_dir):
  workdir, config = trained_workdir
  config = config.copy_and_resolve_references()
  config.cam.annotations = str(synthetic_dir / 'synthetic_annotations.csv')
  config.cam.num_abnormal, config.cam.num_uncertain = 2, 1
  config.cam.bootstrap_resamples = 200
  summary = cam.run(config, str(workdir))
  out = workdir / 'cam' / 'validation'
  assert len(summary['studies']) == 3
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
  sanity = written['sanity']
  assert 0 <= sanity['blank_image']['probability'] <= 1
  assert -1 <= sanity['model_randomisation']['mean_rank_correlation'] <= 1
  assert 'pointing' in (out / 'localisation.md').read_text()


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
  real_predict_split, real_sanity_checks, model_maps = inference_steps.predict_split, localisation.sanity_checks, {}

  def predict_split(*args, **kwargs):
    out = real_predict_split(*args, **kwargs)
    model_maps['map'] = out['map']
    return {**out, 'map': pointing}

  def sanity_checks(predictor, maps, *args, **kwargs):  # they compare with the model's own maps
    return real_sanity_checks(predictor, model_maps['map'], *args, **kwargs)

  monkeypatch.setattr(inference_steps, 'predict_split', predict_split)
  monkeypatch.setattr(localisation, 'sanity_checks', sanity_checks)
  run = config.copy_and_resolve_references()
  run.cam.annotations = str(synthetic_dir / 'synthetic_annotations.csv')
  run.cam.num_abnormal, run.cam.num_uncertain, run.cam.bootstrap_resamples = 1, 0, 200
  local = cam.run(run, str(workdir))['localisation']
  assert local['n_views'] == len(boxes)
  scored = local['groups']['all']
  assert scored['cam']['pointing']['value'] == 1.0
  assert scored['random']['pointing']['value'] < 0.5
  assert local['advantage']['random']['ci_low'] > 0  # paired over the same resampled views
